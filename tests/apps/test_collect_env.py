import re
import subprocess
import sys

import pytest

from d2kd.compat import has_compiled_extension

pytestmark = pytest.mark.slow


def test_collect_env_reports_detectron2_and_extension():
    out = subprocess.run([sys.executable, "-m", "d2kd.apps.collect_env"], capture_output=True,
                         text=True, check=True).stdout
    match = re.search(r"^detectron2: (\S+) compiled: (yes|no)$", out, re.MULTILINE)
    assert match, out
    assert match.group(2) == ("yes" if has_compiled_extension() else "no")
    for key in ("torch:", "torchvision:", "device:", "detectron2 location:"):
        assert key in out
