"""The library versions loraforge/distributed/_compat.py and loraforge/core/compat.py were written and
tested for: a release outside them may have moved the internals they use, so this fails until someone
has re-checked them."""

import importlib.metadata
import re

import pytest

# package: (lowest tested major.minor, first major.minor not yet checked)
TESTED = {"accelerate": ((1, 16), (1, 17)), "deepspeed": ((0, 19), (0, 20)), "torch": ((2, 13), (2, 14)),
          "transformers": ((5, 25), (5, 26))}


@pytest.mark.parametrize("package", sorted(TESTED))
def test_installed_versions_are_those_compat_was_checked_against(package):
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{package} is not installed")  # DeepSpeed is an optional extra
    major_minor = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", version).groups())
    lowest, beyond = TESTED[package]
    assert lowest <= major_minor < beyond, (
        f"{package} {version} is outside the range loraforge/distributed/_compat.py was written and tested for "
        f"({'.'.join(map(str, lowest))} up to before {'.'.join(map(str, beyond))}): re-check every function "
        f"there against {package} {version} (run tests/test_distributed.py), then update its docstring and "
        f"TESTED in tests/test_compat.py")
