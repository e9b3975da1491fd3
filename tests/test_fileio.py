"""Small files written whole: a temp file beside the target, then a rename."""


def test_atomic_writes_have_ordinary_permissions(tmp_path):
    """mkstemp creates 0600 files; a card or verification.json must be readable like any file."""
    import os

    from gqa_convert.fileio import write_json_atomic

    probe = tmp_path / "probe"
    probe.write_text("x")
    path = write_json_atomic(tmp_path / "verification.json", {"passed": True})
    assert os.stat(path).st_mode & 0o777 == os.stat(probe).st_mode & 0o777
