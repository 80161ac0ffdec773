"""The repository speaks for itself: no tracker numbers, no paths of one machine."""

from __future__ import annotations

import re
import subprocess

import pytest

from .conftest import REPO_ROOT

MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|home|Users|root)/[\w.-]+")
TRACKER_NUMBER = re.compile(r"\b(?:issues?|tasks?|stops?)\s+#?\d+", re.IGNORECASE)
# other projects' trackers are real references (e.g. "pynetdicom's issues 850 and 875")
OTHER_PROJECT = re.compile(r"pynetdicom|pydicom|orthanc|dcmtk|pgserver|torch|alembic",
                           re.IGNORECASE)


def tracked_text_files() -> list[str]:
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True,
                                text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"not a git checkout: {error}")
    this_file = "tests/test_repository.py"  # its examples below are what the others must not hold
    return [name for name in listed
            if name and name != this_file and (REPO_ROOT / name).is_file()]


def offending_lines(pattern: re.Pattern, *, unless: re.Pattern | None = None) -> list[str]:
    found = []
    for name in tracked_text_files():
        try:
            text = (REPO_ROOT / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary files
        for number, line in enumerate(text.splitlines(), 1):
            if pattern.search(line) and not (unless and unless.search(line)):
                found.append(f"{name}:{number}: {line.strip()[:120]}")
    return found


def test_no_absolute_paths_of_a_machine_in_tracked_files():
    assert offending_lines(MACHINE_PATH) == []


def test_no_tracker_numbers_in_tracked_files():
    assert offending_lines(TRACKER_NUMBER, unless=OTHER_PROJECT) == []


@pytest.mark.parametrize("line, machine_path, tracker", [
    ("see /work/shared/design/method.md", True, False),
    ("(issue 7, method.md B.2)", False, True),
    ("the first speed-up round", False, False),
    ("a path relative to the repo: ../shared/data/dicom", False, False),
    ("storage under /var/lib/pacs", False, False),
])
def test_the_patterns_find_what_they_should(line, machine_path, tracker):
    assert bool(MACHINE_PATH.search(line)) is machine_path
    assert bool(TRACKER_NUMBER.search(line)) is tracker
