/* A standalone check of fieldkit/training/_delta.c, for building it for other machines (the
 * aarch64 of a DGX Spark, under qemu) where Python and torch are not at hand: float32 and
 * bfloat16 pairs of sizes around the vector width and the piece size, on 1 to 4 threads,
 * against a plain float64 loop; then NaN and inf. Exits non-zero on any mismatch. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int fieldkit_delta(int64_t count, const char *const *a, const char *const *b, const int64_t *n,
                   int dtype, int threads, double *out);

static uint32_t state = 12345;
static float uniform(void) { /* in [-3, 3) */
  state = state * 1664525u + 1013904223u;
  return ((state >> 8) / 16777216.0f) * 6 - 3;
}

static float store(char *p, int64_t i, float x, int dtype) { /* returns the value stored */
  if (dtype == 0) {
    memcpy(p + 4 * i, &x, 4);
    return x;
  }
  uint32_t u;
  memcpy(&u, &x, 4);
  uint16_t h = u >> 16;
  memcpy(p + 2 * i, &h, 2);
  u = (uint32_t)h << 16;
  memcpy(&x, &u, 4);
  return x;
}

int main(void) {
  enum { COUNT = 10 };
  const int64_t sizes[COUNT] = {1, 7, 15, 16, 17, 100, 65535, 65536, 65537, 200003};
  int failures = 0;
  for (int dtype = 0; dtype < 2; dtype++)
    for (int threads = 1; threads <= 4; threads++) {
      const char *a[COUNT], *b[COUNT];
      double sq = 0, mx = 0, out[2];
      for (int k = 0; k < COUNT; k++) {
        char *pa = malloc(sizes[k] * 4), *pb = malloc(sizes[k] * 4);
        for (int64_t i = 0; i < sizes[k]; i++) {
          float d = store(pa, i, uniform(), dtype) - store(pb, i, uniform(), dtype);
          sq += (double)d * d;
          mx = fabsf(d) > mx ? fabsf(d) : mx;
        }
        a[k] = pa, b[k] = pb;
      }
      fieldkit_delta(COUNT, a, b, sizes, dtype, threads, out);
      int ok = fabs(out[0] - sq) <= 1e-12 * sq && out[1] == mx;
      failures += !ok;
      printf("dtype %d, %d threads: sum %.17g (loop %.17g), max %.9g (loop %.9g) %s\n", dtype,
             threads, out[0], sq, out[1], mx, ok ? "ok" : "MISMATCH");
      for (int k = 0; k < COUNT; k++) free((void *)a[k]), free((void *)b[k]);
    }
  float zero[20] = {0}, odd[20] = {0};
  const char *a[1] = {(const char *)zero}, *b[1] = {(const char *)odd};
  const int64_t n[1] = {20};
  double out[2];
  odd[13] = NAN;
  fieldkit_delta(1, a, b, n, 0, 1, out);
  failures += !isnan(out[0]);
  odd[13] = INFINITY;
  fieldkit_delta(1, a, b, n, 0, 1, out);
  failures += !(isinf(out[0]) && isinf(out[1]));
  printf("NaN and inf: %s\n", failures ? "see above" : "ok");
  return failures != 0;
}
