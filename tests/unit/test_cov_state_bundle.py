"""Container state on disk (StateStore) and OCI bundle loading/validation (runc's rules)."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import string
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runm.errors import RunmError
from runm.sandbox.bundle import Bundle, load_bundle, validate_id
from runm.sandbox.spec import default_spec, write_spec
from runm.sandbox.state import DEFAULT_ROOT, ContainerRecord, StateStore, rfc3339_now


def rec(cid: str = "c1", **kw: Any) -> ContainerRecord:
    return ContainerRecord(id=cid, bundle="/b", rootfs="/b/rootfs", **kw)


# --- StateStore ------------------------------------------------------------------------------


def test_create_then_load_round_trips_every_field(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "root")
    record = rec(status="running", pid=12, annotations={"k": "v"}, owner="me",
                 vm={"run_dir": "/run/x", "monitor_pid": 3})
    store.create(record)
    assert store.load("c1") == record
    assert (tmp_path / "root" / "c1" / "state.json").is_file()
    assert store.dir("c1") == tmp_path / "root" / "c1"


def test_create_makes_private_traversable_directories(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "a" / "root")
    old = os.umask(0)
    try:
        store.create(rec())
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "root").stat().st_mode & 0o777 == 0o711
    assert store.dir("c1").stat().st_mode & 0o777 == 0o711


def test_create_twice_fails_and_keeps_the_first_record(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.create(rec(pid=1))
    with pytest.raises(RunmError, match="container with given ID already exists"):
        store.create(rec(pid=2))
    assert store.load("c1").pid == 1


def test_concurrent_create_of_one_id_has_exactly_one_winner(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "root")
    n = 8
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def claim(i: int) -> None:
        barrier.wait()
        try:
            store.create(rec("same", pid=i))
            results[i] = "won"
        except RunmError as err:
            results[i] = err.message

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert results.count("won") == 1
    assert results.count("container with given ID already exists") == n - 1
    assert store.load("same").pid == results.index("won")


def test_create_under_an_unusable_root(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(RunmError, match=r"creating state root .*/file/root: Not a directory"):
        StateStore(tmp_path / "file" / "root").create(rec())


def test_save_replaces_atomically(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    record = rec()
    store.create(record)
    record.status = "stopped"
    store.save(record)
    assert store.load("c1").status == "stopped"
    assert sorted(p.name for p in store.dir("c1").iterdir()) == ["state.json"]  # no tmp left


def test_load_errors(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    with pytest.raises(RunmError, match=r"^container does not exist$"):
        store.load("nope")
    (tmp_path / "afile").write_text("")
    with pytest.raises(RunmError, match=r"^container does not exist$"):
        store.load("afile")  # a file where the container's directory should be
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunmError, match=r"^container does not exist$"):
        store.load("empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "state.json").write_text("{truncated")
    with pytest.raises(RunmError, match=r"^reading state of bad: "):
        store.load("bad")


def test_fields_from_another_version_are_ignored(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.create(rec())
    data = json.loads((store.dir("c1") / "state.json").read_text())
    data["added_in_a_later_version"] = 1
    (store.dir("c1") / "state.json").write_text(json.dumps(data))
    assert store.load("c1").id == "c1"
    (store.dir("c1") / "state.json").write_text(json.dumps({"id": "c1"}))
    with pytest.raises(RunmError, match="reading state of c1"):
        store.load("c1")


def test_remove(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.create(rec())
    (store.dir("c1") / "extra").mkdir()
    store.remove("c1")
    assert not store.dir("c1").exists()
    store.remove("c1")  # already gone: fine
    with pytest.raises(RunmError, match="container does not exist"):
        store.load("c1")


def test_lock_is_exclusive_while_held(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.create(rec())
    other = os.open(store.dir("c1") / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        with store.lock("c1"), pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on exit
        fcntl.flock(other, fcntl.LOCK_UN)
        with pytest.raises(ValueError), store.lock("c1"):
            raise ValueError  # released on errors too
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(other)


def test_lock_serializes_read_modify_write(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.create(rec(pid=0))

    def bump() -> None:
        for _ in range(20):
            with store.lock("c1"):
                record = store.load("c1")
                record.pid += 1
                store.save(record)

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert store.load("c1").pid == 80


def test_lock_on_a_missing_container(tmp_path: Path) -> None:
    with pytest.raises(RunmError, match=r"^container does not exist$"), \
            StateStore(tmp_path).lock("nope"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_default_root() -> None:
    assert StateStore().root == DEFAULT_ROOT == Path("/run/runm")
    assert StateStore("").root == DEFAULT_ROOT
    assert StateStore("/x").root == Path("/x")


def test_rfc3339_now_has_nanosecond_precision_in_utc() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", rfc3339_now())
    assert re.fullmatch(r".*\.\d{9}Z", rec().created)


def test_oci_state_shape() -> None:
    state = rec(status="created", pid=5, created="T").oci_state()
    assert state == {"ociVersion": "1.0.2-dev", "id": "c1", "pid": 5, "status": "created",
                     "bundle": "/b", "rootfs": "/b/rootfs", "created": "T", "owner": ""}
    for status in ("creating", "stopped"):
        assert rec(status=status, pid=5).oci_state()["pid"] == 0
    assert list(rec(annotations={"a": "1"}).oci_state())[-2:] == ["annotations", "owner"]


def test_records_do_not_share_mutable_defaults() -> None:
    a, b = rec(), rec()
    a.vm["x"] = 1
    a.annotations["y"] = "2"
    assert b.vm == {}
    assert b.annotations == {}
    assert dataclasses.asdict(b)["vm"] == {}


# --- validate_id -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cid",
    ["a", "Z", "0", "a_b", "a+b", "a-b", "a.b", "..a", "a..b", "a.", "-", "_", "+",
     "0123456789abcdef" * 4, "k8s_POD_nginx-1.2+build"],
)
def test_validate_id_accepts_runc_valid_ids(cid: str) -> None:
    validate_id(cid)


@pytest.mark.parametrize(
    "cid",
    [".", "..", "a/b", "/a", "a/", "../a", "./a", "a b", " a", "a\tb", "a:b", "a@b", "a*b",
     "a$b", "a\x00b", "a\\b", "a;b", "\nab"],
)
def test_validate_id_rejects_the_rest(cid: str) -> None:
    with pytest.raises(RunmError) as info:
        validate_id(cid)
    assert info.value.message == f"invalid container id format: {cid}"


def test_validate_id_empty() -> None:
    with pytest.raises(RunmError, match=r"^container id cannot be empty$"):
        validate_id("")


def test_validate_id_rejects_a_trailing_newline() -> None:
    with pytest.raises(RunmError):
        validate_id("abc\n")


def test_validate_id_rejects_non_ascii_letters() -> None:
    with pytest.raises(RunmError):
        validate_id("café")


ID_CHARS = string.ascii_letters + string.digits + "_+-."
# printable ASCII except "," (runc 1.1's regex allows it; see the report) and newline
OTHER_CHARS = "".join(c for c in string.printable if c not in ID_CHARS + ",\n")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=ID_CHARS + OTHER_CHARS, min_size=1, max_size=20))
def test_property_validate_id_matches_runc_rule(cid: str) -> None:
    valid = all(c in ID_CHARS for c in cid) and cid not in (".", "..")
    try:
        validate_id(cid)
    except RunmError:
        assert not valid
    else:
        assert valid


# --- load_bundle -----------------------------------------------------------------------------


def make_bundle(path: Path, spec: Any = None, rootfs: str | None = "rootfs") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if rootfs:
        (path / rootfs).mkdir(parents=True, exist_ok=True)
    if spec is not None:
        (path / "config.json").write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return path


def test_load_bundle_of_the_default_spec(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    write_spec(bundle, default_spec(["echo", "hi"], terminal=False))
    loaded = load_bundle(bundle)
    assert loaded.path == bundle
    assert loaded.rootfs == bundle / "rootfs"
    assert loaded.spec["process"]["args"] == ["echo", "hi"]
    assert loaded.terminal is False
    assert loaded.namespaces() == {"pid", "network", "ipc", "uts", "mount"}
    assert loaded.annotations == {}


def test_load_bundle_defaults_to_cwd_and_makes_paths_absolute(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = make_bundle(tmp_path / "b", default_spec())
    monkeypatch.chdir(tmp_path)
    assert load_bundle("b").path == bundle
    monkeypatch.chdir(bundle)
    assert load_bundle(None).path == bundle
    assert load_bundle("").path == bundle
    assert load_bundle(Path(".")).rootfs == bundle / "rootfs"


def test_bundle_root_path_absolute_relative_and_missing(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    spec = default_spec()
    spec["root"] = {"path": str(elsewhere)}
    assert load_bundle(make_bundle(tmp_path / "a", spec, rootfs=None)).rootfs == elsewhere
    spec["root"] = {"path": "my/root"}
    b = make_bundle(tmp_path / "b", spec, rootfs="my/root")
    assert load_bundle(b).rootfs == b / "my" / "root"
    del spec["root"]
    c = make_bundle(tmp_path / "c", spec)
    assert load_bundle(c).rootfs == c / "rootfs"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{not json", "parsing {config}: invalid JSON: "),
        ("[1, 2]", "parsing {config}: the specification must be a JSON object"),
        ('"text"', "parsing {config}: the specification must be a JSON object"),
        ({"process": ["sh"]}, "parsing {config}: process must be an object"),
        ({"process": {"args": ["sh"]}, "root": "rootfs"}, "parsing {config}: root must be an "
                                                          "object"),
        ({"root": {"path": "rootfs"}}, "process not found in config"),
        ({"process": {"args": []}}, "args must not be empty"),
        ({"process": {"cwd": "/"}}, "args must not be empty"),
        ({"process": {"args": ["sh"]}, "root": {"path": "missing"}},
         "invalid rootfs: stat {bundle}/missing: no such file or directory"),
    ],
)
def test_load_bundle_config_errors(spec: Any, message: str, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", spec)
    with pytest.raises(RunmError) as info:
        load_bundle(bundle)
    expected = message.format(config=bundle / "config.json", bundle=bundle)
    assert info.value.message.startswith(expected), info.value.message


def test_rootfs_is_checked_before_the_process(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", {"root": {"path": "nope"}}, rootfs=None)
    with pytest.raises(RunmError, match=r"^invalid rootfs: stat "):
        load_bundle(bundle)


def test_load_bundle_path_errors(tmp_path: Path) -> None:
    with pytest.raises(RunmError) as info:
        load_bundle(tmp_path / "missing")
    assert info.value.message == f"chdir {tmp_path / 'missing'}: no such file or directory"
    (tmp_path / "file").write_text("")
    with pytest.raises(RunmError) as info:
        load_bundle(tmp_path / "file")
    assert info.value.message == f"chdir {tmp_path / 'file'}: not a directory"
    make_bundle(tmp_path / "noconfig")
    with pytest.raises(RunmError, match=r"^JSON specification file config.json not found$"):
        load_bundle(tmp_path / "noconfig")
    (make_bundle(tmp_path / "dirconfig") / "config.json").mkdir()
    with pytest.raises(RunmError) as info:
        load_bundle(tmp_path / "dirconfig")
    assert info.value.message == f"open {tmp_path / 'dirconfig' / 'config.json'}: Is a directory"


def test_bundle_properties() -> None:
    spec = {
        "process": {"terminal": True, "args": ["sh"]},
        "annotations": {"org.example": "1"},
        "linux": {"namespaces": [{"type": "pid"}, {"type": "user", "path": "/proc/1/ns/user"},
                                 {"type": "pid"}]},
    }
    bundle = Bundle(Path("/b"), spec)
    assert bundle.terminal is True
    assert bundle.namespaces() == {"pid", "user"}
    annotations = bundle.annotations
    assert annotations == {"org.example": "1"}
    annotations["changed"] = "x"
    assert bundle.annotations == {"org.example": "1"}  # a copy


@pytest.mark.parametrize(
    "spec",
    [{}, {"process": None, "linux": None, "annotations": None, "root": None},
     {"linux": {"namespaces": None}}, {"process": {}}],
)
def test_bundle_properties_with_sections_missing(spec: dict[str, Any]) -> None:
    bundle = Bundle(Path("/b"), spec)
    assert bundle.terminal is False
    assert bundle.namespaces() == set()
    assert bundle.annotations == {}
    assert bundle.rootfs == Path("/b/rootfs")
