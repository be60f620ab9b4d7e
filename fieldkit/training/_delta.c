/* fieldkit's fused weight delta: over many pairs of contiguous CPU arrays (a[k], b[k]) of
 * n[k] elements, the sum of (a - b)^2 and the max of |a - b|, in one pass over memory.
 *
 * Why C: the same sums in torch ops read the scattered tensors into a buffer, then make four
 * more passes over it (subtract, min/max, square, sum), one op call each. Here each element is
 * loaded once; the difference is taken in float32 (bfloat16 is widened first, exactly), then
 * squared and summed in float64, so the squares are exact and the sum can neither overflow nor
 * underflow. Software prefetch runs both streams ahead of the loads, and the threads share the
 * work in small pieces whose sums are added in a fixed order: the same bits on any number of
 * threads.
 *
 * Portable C with GCC/Clang vector extensions (SSE2 on x86-64, NEON on aarch64, no -march);
 * on x86-64 with glibc an AVX2 clone is picked at load time where the CPU has it. Built with
 * the system C compiler on first use and loaded with ctypes by _kernel.py.
 * NaN anywhere makes the sum NaN (the max may miss it; the caller checks the sum). */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 1 };
enum { LANES = 16, AHEAD = 1024, UNIT = 1 << 16, MAX_THREADS = 64 };

#pragma GCC diagnostic ignored "-Wpsabi" /* 32-byte vectors only pass between inlined helpers */

typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef double v4d __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

/* Eight elements from p, widened to float32 (a bfloat16 is the top half of a float32). */
static inline __attribute__((always_inline)) v8f load8(const char *p, int dtype) {
  if (dtype == F32) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
  }
  v8h h;
  memcpy(&h, p, sizeof h);
  return (v8f)(__builtin_convertvector(h, v8u) << 16);
}

/* The squares of four of d's elements (the low or high half), in float64. */
static inline __attribute__((always_inline)) v4d square_half(v8f d, int high) {
  v4f h;
  memcpy(&h, (const char *)&d + high * sizeof h, sizeof h);
  v4d x = __builtin_convertvector(h, v4d);
  return x * x;
}

/* Lane by lane, the larger of m and |d|. */
static inline __attribute__((always_inline)) v8f max_abs(v8f m, v8f d) {
  v8f ad = (v8f)((v8i)d & 0x7fffffff);
  v8i keep = m > ad;
  return (v8f)((keep & (v8i)m) | (~keep & (v8i)ad));
}

/* Adds LANES elements of a - b (of `size` bytes each) to the sums s and maxima m. */
static inline __attribute__((always_inline)) void step(const char *a, const char *b, int size,
                                                       int dtype, v4d s[4], v8f m[2]) {
  v8f d0 = load8(a, dtype) - load8(b, dtype);
  v8f d1 = load8(a + 8 * size, dtype) - load8(b + 8 * size, dtype);
  s[0] += square_half(d0, 0);
  s[1] += square_half(d0, 1);
  s[2] += square_half(d1, 0);
  s[3] += square_half(d1, 1);
  m[0] = max_abs(m[0], d0);
  m[1] = max_abs(m[1], d1);
}

/* The sum of squares of a - b over n elements; folds their |a - b| into the maxima *mx. */
static inline __attribute__((always_inline)) double span(const char *a, const char *b, int64_t n,
                                                         int dtype, v8f *mx) {
  const int size = dtype == F32 ? 4 : 2;
  v4d s[4] = {{0}, {0}, {0}, {0}};
  v8f m[2] = {*mx, *mx};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    __builtin_prefetch(a + (i + AHEAD) * size);
    __builtin_prefetch(b + (i + AHEAD) * size);
    step(a + i * size, b + i * size, size, dtype, s, m);
  }
  if (i < n) { /* the tail, zero-padded: a zero difference adds nothing */
    char ta[LANES * 4] = {0}, tb[LANES * 4] = {0};
    memcpy(ta, a + i * size, (n - i) * size);
    memcpy(tb, b + i * size, (n - i) * size);
    step(ta, tb, size, dtype, s, m);
  }
  *mx = max_abs(m[0], m[1]);
  v4d t = (s[0] + s[1]) + (s[2] + s[3]);
  return (t[0] + t[1]) + (t[2] + t[3]);
}

/* The work, cut into pieces of at most UNIT elements (piece u: pair k[u], elements from s[u])
 * that the threads take one at a time, so a thread held up (by torch's spinning OpenMP
 * workers, say) takes fewer, and the call never takes longer than on one thread. Each piece's
 * sum goes to its own slot, added up in piece order at the end: the same bits whichever thread
 * took which piece, and however many threads there were. */
typedef struct {
  const char *const *a, *const *b;
  const int64_t *n, *k, *s;
  double *sq;
  int64_t pieces, next;
  int dtype;
} work_t;

typedef struct {
  work_t *work;
  v8f mx;
} job_t;

#if defined(__x86_64__) && defined(__GLIBC__)
__attribute__((target_clones("avx2", "default"))) /* chosen once, at load time */
#endif
static void *run(void *arg) {
  job_t *j = arg;
  work_t *w = j->work;
  const int size = w->dtype == F32 ? 4 : 2;
  for (int64_t u; (u = __atomic_fetch_add(&w->next, 1, __ATOMIC_RELAXED)) < w->pieces;) {
    int64_t k = w->k[u], s = w->s[u], e = s + UNIT < w->n[k] ? s + UNIT : w->n[k];
    const char *a = w->a[k] + s * size, *b = w->b[k] + s * size;
    w->sq[u] = w->dtype == F32 ? span(a, b, e - s, F32, &j->mx) : span(a, b, e - s, BF16, &j->mx);
  }
  return NULL;
}

/* out[0] = sum of (a - b)^2, out[1] = max |a - b| over `count` pairs of dtype F32 or BF16,
 * on up to `threads` threads (the calling one included). Returns 0, or -1 out of memory. */
int fieldkit_delta(int64_t count, const char *const *a, const char *const *b, const int64_t *n,
                   int dtype, int threads, double *out) {
  int64_t pieces = 0;
  for (int64_t k = 0; k < count; k++) pieces += (n[k] + UNIT - 1) / UNIT;
  int64_t *ks = malloc(3 * (pieces ? pieces : 1) * sizeof *ks);
  if (!ks) return -1;
  int64_t *ss = ks + pieces;
  double *sq = (double *)(ss + pieces);
  for (int64_t k = 0, u = 0; k < count; k++)
    for (int64_t s = 0; s < n[k]; s += UNIT, u++) ks[u] = k, ss[u] = s;
  work_t work = {a, b, n, ks, ss, sq, pieces, 0, dtype};
  if (threads < 1) threads = 1;
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  job_t jobs[MAX_THREADS];
  pthread_t ids[MAX_THREADS];
  int started[MAX_THREADS] = {0};
  for (int t = 0; t < threads; t++) jobs[t] = (job_t){&work, {0}};
  for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], NULL, run, &jobs[t]) == 0;
  run(&jobs[0]); /* takes what the others don't, including the share of any that didn't start */
  double mx = 0;
  for (int t = 0; t < threads; t++) {
    if (started[t]) pthread_join(ids[t], NULL);
    for (int l = 0; l < 8; l++) mx = jobs[t].mx[l] > mx ? jobs[t].mx[l] : mx;
  }
  out[0] = 0;
  for (int64_t u = 0; u < pieces; u++) out[0] += sq[u];
  out[1] = mx;
  free(ks);
  return 0;
}
