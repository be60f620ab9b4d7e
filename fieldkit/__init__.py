"""fieldkit: fine-tuning primitives for hand-written PPO / GRPO / DPO / SFT loops.

Distributed as ``fieldkit-training``. The package registry's ``fieldkit`` is another project
that also installs a top-level ``fieldkit`` package: the two cannot be installed together.
"""

__version__ = "0.1.0"


def _refuse_to_share() -> None:
    """Warn when the registry's ``fieldkit`` is installed too: one of the two ``fieldkit``
    packages hides the other, so which one imports depends on sys.path order."""
    import warnings
    from importlib import metadata

    try:
        other = metadata.distribution("fieldkit")
    except metadata.PackageNotFoundError:
        return
    warnings.warn(
        f"fieldkit: a distribution named 'fieldkit' ({other.version}) is installed beside "
        "'fieldkit-training': the registry's 'fieldkit' (another project), or this project "
        "installed under its old name. Both put a top-level 'fieldkit' package in place, so one "
        "hides the other: pip uninstall fieldkit, then reinstall fieldkit-training.",
        UserWarning,
        stacklevel=3,
    )


_refuse_to_share()
