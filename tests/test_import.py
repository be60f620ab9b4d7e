"""Importing costs nothing; a missing dependency is one clear ImportError."""

import subprocess
import sys
import textwrap

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_import_does_not_import_torch():
    done = _run(
        """
        import sys, fieldkit.training as t
        assert "torch" not in sys.modules, "torch imported"
        assert "capture_trainable" in dir(t) and "LoraReferenceSnapshot" in t.__all__
        print("ok")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.parametrize(
    "name",
    ["LoraReferenceSnapshot", "WeightDeltaTracker", "capture_trainable", "swap_in", "weight_delta"],
)
def test_missing_torch_is_a_clear_import_error(name):
    done = _run(
        f"""
        import sys
        sys.modules["torch"] = None  # as if torch were not installed
        try:
            from fieldkit.training import {name}
        except ImportError as e:
            print(e)
        """
    )
    assert done.returncode == 0, done.stderr
    assert f"fieldkit.training.{name} needs PyTorch" in done.stdout
    assert "pip install torch" in done.stdout


def test_missing_safetensors_is_a_clear_import_error_in_from_disk():
    done = _run(
        """
        import sys
        import torch
        sys.modules["safetensors"] = None  # as if safetensors were not installed
        from fieldkit.training import LoraReferenceSnapshot
        try:
            LoraReferenceSnapshot.from_disk(torch.nn.Linear(1, 1), "adapter")
        except ImportError as e:
            print(e)
        """
    )
    assert done.returncode == 0, done.stderr
    assert "load_adapter_dict needs safetensors" in done.stdout
    assert "pip install safetensors" in done.stdout


def test_unknown_name_is_an_attribute_error():
    import fieldkit.training

    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        fieldkit.training.nope  # noqa: B018


def test_the_classes_and_functions_never_import_transformers_and_hf_says_what_it_needs():
    done = _run(
        """
        import sys, torch
        from fieldkit.training import LoraReferenceSnapshot, WeightDeltaTracker, delta_report
        model = torch.nn.Linear(2, 2)
        WeightDeltaTracker(model).report()
        with LoraReferenceSnapshot(model):
            pass
        assert "transformers" not in sys.modules, "transformers imported"
        sys.modules["transformers"] = None  # as if it were not installed
        try:
            import fieldkit.training.hf
        except ImportError as e:
            print(e)
        """
    )
    assert done.returncode == 0, done.stderr
    assert "fieldkit.training.hf needs transformers" in done.stdout


def test_the_registrys_fieldkit_installed_beside_this_one_is_named(tmp_path):
    """Another project called fieldkit on the registry installs a top-level `fieldkit` too."""
    info = tmp_path / "fieldkit-0.34.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fieldkit\nVersion: 0.34.1\n")
    done = _run(
        f"""
        import sys, warnings
        sys.path.append({str(tmp_path)!r})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fieldkit.training
        print(*[w.message for w in caught], sep="\\n")
        """
    )
    assert done.returncode == 0, done.stderr
    assert "named 'fieldkit' (0.34.1) is installed beside 'fieldkit-training'" in done.stdout
    assert "pip uninstall fieldkit" in done.stdout


def test_install_hints_name_this_distribution_and_never_a_bare_torch():
    done = _run(
        """
        import sys
        sys.modules["torch"] = None
        try:
            import fieldkit.training.hf
        except ImportError as e:
            print(e)
        """
    )
    assert "fieldkit-training[peft]" in done.stdout
    assert "--index-url https://download.pytorch.org/whl/cpu" in done.stdout
    assert "'fieldkit[" not in done.stdout
