"""The runm command line in-process: what runc callers (go-runc, podman, containerd) read.

No test boots a VM: `run` is only driven up to the errors it reports before booting. State
records are written directly; a record counts as live only while the process that owns its VM
is alive, so "live" records name a stand-in child process as their foreground `runm run`.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from runm.cli import logs, verbs
from runm.cli import main as cli
from runm.cli.progress import Progress
from runm.sandbox.spec import default_spec, write_spec
from runm.sandbox.state import ContainerRecord, StateStore

CREATED = "2024-05-06T07:08:09.123456789Z"


@pytest.fixture(autouse=True)
def _restore_logging(tmp_path: Path) -> Iterator[None]:
    """main() replaces the root logger's handlers; put pytest's back and close log files."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers and isinstance(handler, logging.StreamHandler):
                name = getattr(handler.stream, "name", None)
                if isinstance(name, str) and name.startswith(str(tmp_path)):
                    handler.stream.close()  # a --log FILE this test opened
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.fixture(autouse=True)
def _plain_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    """Error text as when stderr is not a terminal, whatever pytest's capture mode."""
    monkeypatch.setattr(logs, "stderr_is_terminal", lambda: False)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "state"


def run(root: Path, *args: str) -> int:
    return cli.main(["--root", str(root), *args])


def record(cid: str, status: str, pid: int = 0, **kw: object) -> ContainerRecord:
    return ContainerRecord(id=cid, bundle=f"/bundles/{cid}", rootfs=f"/bundles/{cid}/rootfs",
                           status=status, pid=pid, created=CREATED, **kw)  # type: ignore[arg-type]


@pytest.fixture
def owner() -> Iterator[int]:
    """A live process that passes for a foreground `runm run` (its command line says runm)."""
    proc = subprocess.Popen(["sh", "-c", "read _", "runm-test-foreground"],
                            stdin=subprocess.PIPE)
    try:
        yield proc.pid
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)


@pytest.fixture
def populated(root: Path, owner: int) -> StateStore:
    store = StateStore(root)
    store.create(record("beta", "stopped", pid=7))
    store.create(record("alpha", "running", pid=42, owner="alice",
                        vm={"foreground_pid": owner}))
    # its VM owner is gone: reported as stopped whatever the record says
    store.create(record("gamma-1.0", "created", pid=9, annotations={"a": "b"}))
    return store


def error_line(err: str) -> str:
    """The message of the one logrus-style error line runm wrote to stderr."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    m = re.fullmatch(r'time="[^"]+" level=error msg=(".*")', lines[0])
    assert m, lines[0]
    return str(json.loads(m.group(1)))


# --- version, help ---------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--version", "-v"])
def test_version_first_line_is_what_go_runc_parses(
        flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([flag]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"runc version {cli.RUNC_COMPAT_VERSION}"
    assert re.fullmatch(r"runc version \d+\.\d+\.\d+", lines[0])
    assert "spec: 1.0.2-dev" in lines
    assert any(line.startswith("runm: ") for line in lines)


def test_no_command_prints_help_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("usage: runm")
    assert "RUNM_DATA_DIR" in captured.err


@pytest.mark.parametrize("group,subcommand", [("guest", "build"), ("pool", "fill")])
def test_group_without_subcommand_prints_its_own_help(
        group: str, subcommand: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([group]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"usage: runm {group} ")
    assert subcommand in err


def test_subcommand_usage_names_the_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["pool", "fill", "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: runm pool fill [-h]")


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# --- spec ------------------------------------------------------------------------------------


def test_spec_writes_runc_default_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["spec"]) == 0
    text = (tmp_path / "config.json").read_text()
    assert json.loads(text) == default_spec()
    assert text.startswith('{\n\t"ociVersion": "1.0.2-dev"')  # runc indents with tabs
    assert capsys.readouterr() == ("", "")


def test_spec_refuses_to_overwrite(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text("mine")
    assert cli.main(["spec"]) == 1
    assert error_line(capsys.readouterr().err) == "File config.json exists. Remove it first"
    assert (tmp_path / "config.json").read_text() == "mine"


def test_spec_bundle_and_rootless(tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    bundle.mkdir()
    assert cli.main(["spec", "--bundle", str(bundle), "--rootless"]) == 0
    spec = json.loads((bundle / "config.json").read_text())
    assert spec == default_spec(rootless=True)
    assert {"type": "user"} in spec["linux"]["namespaces"]
    assert not (tmp_path / "config.json").exists()


# --- list ------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_root", [False, True])
def test_list_empty(root: Path, make_root: bool, capsys: pytest.CaptureFixture[str]) -> None:
    if make_root:
        root.mkdir()
    assert run(root, "list") == 0
    out = capsys.readouterr().out
    assert out.splitlines() == ["ID   PID   STATUS   BUNDLE   CREATED   OWNER"]
    assert run(root, "list", "--format", "json") == 0
    assert json.loads(capsys.readouterr().out) == []
    assert run(root, "list", "-q") == 0
    assert capsys.readouterr().out == ""
    assert not root.exists() or not any(root.iterdir())  # listing creates nothing


def test_list_table(populated: StateStore, root: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    assert run(root, "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split() for line in lines] == [
        ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"],
        ["alpha", "42", "running", "/bundles/alpha", CREATED, "alice"],
        ["beta", "0", "stopped", "/bundles/beta", CREATED, "root"],  # stopped: pid 0
        ["gamma-1.0", "0", "stopped", "/bundles/gamma-1.0", CREATED, "root"],
    ]
    # columns are aligned
    for column in ("STATUS", "CREATED", "OWNER"):
        start = lines[0].index(column)
        assert all(line[start - 1] == " " and line[start] != " " for line in lines)


def test_list_json_and_quiet(populated: StateStore, root: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    assert run(root, "list", "-f", "json") == 0
    states = json.loads(capsys.readouterr().out)
    assert [s["id"] for s in states] == ["alpha", "beta", "gamma-1.0"]
    assert states[0] == populated.load("alpha").oci_state()
    assert states[1]["pid"] == 0
    assert (states[2]["status"], states[2]["pid"]) == ("stopped", 0)
    assert states[2]["annotations"] == {"a": "b"}
    assert run(root, "ls", "-q") == 0
    assert capsys.readouterr().out.splitlines() == ["alpha", "beta", "gamma-1.0"]


def test_list_skips_entries_without_valid_state(
        populated: StateStore, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (root / "half-created").mkdir()
    (root / "corrupt").mkdir()
    (root / "corrupt" / "state.json").write_text("{not json")
    (root / "stray-file").write_text("")
    assert run(root, "list", "-q") == 0
    assert capsys.readouterr().out.splitlines() == ["alpha", "beta", "gamma-1.0"]


# --- state -----------------------------------------------------------------------------------


def test_state_prints_runc_state_json(populated: StateStore, root: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert run(root, "state", "alpha") == 0
    state = json.loads(capsys.readouterr().out)
    assert list(state) == ["ociVersion", "id", "pid", "status", "bundle", "rootfs", "created",
                           "owner"]  # no annotations key when there are none
    assert state == {"ociVersion": "1.0.2-dev", "id": "alpha", "pid": 42, "status": "running",
                     "bundle": "/bundles/alpha", "rootfs": "/bundles/alpha/rootfs",
                     "created": CREATED, "owner": "alice"}


def test_state_of_stopped_container_reports_pid_zero_and_annotations(
        populated: StateStore, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(root, "state", "beta") == 0
    beta = json.loads(capsys.readouterr().out)
    assert (beta["status"], beta["pid"]) == ("stopped", 0)
    assert run(root, "state", "gamma-1.0") == 0
    gamma = json.loads(capsys.readouterr().out)
    assert list(gamma)[-2:] == ["annotations", "owner"]
    assert gamma["annotations"] == {"a": "b"}
    assert (gamma["status"], gamma["pid"]) == ("stopped", 0)  # its VM owner is gone


@pytest.mark.parametrize("status", ["created", "paused"])
def test_state_of_live_container_keeps_its_pid(
        status: str, root: Path, owner: int, capsys: pytest.CaptureFixture[str]) -> None:
    StateStore(root).create(record("p", status, pid=5, vm={"foreground_pid": owner}))
    assert run(root, "state", "p") == 0
    state = json.loads(capsys.readouterr().out)
    assert (state["status"], state["pid"]) == (status, 5)


def test_state_once_the_owner_exits(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proc = subprocess.Popen(["sh", "-c", "exit 0", "runm-test-foreground"])
    proc.wait(timeout=10)
    StateStore(root).create(record("gone", "running", pid=5, vm={"foreground_pid": proc.pid}))
    assert run(root, "state", "gone") == 0
    state = json.loads(capsys.readouterr().out)
    assert (state["status"], state["pid"]) == ("stopped", 0)


def test_state_of_missing_container(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(root, "state", "nope") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert error_line(captured.err) == "container does not exist"


def test_state_without_id(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(root, "state") == 1
    assert error_line(capsys.readouterr().err) == "container id cannot be empty"


@pytest.mark.parametrize("bad", ["a/b", "..", ".", "a b", "../x", "/abs"])
@pytest.mark.parametrize("command", ["state", "delete"])
def test_invalid_ids_are_rejected(command: str, bad: str, root: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert run(root, command, bad) == 1
    assert error_line(capsys.readouterr().err) == f"invalid container id format: {bad}"


def test_state_of_an_overlong_id_is_a_clean_error(
        root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root.mkdir()
    assert run(root, "state", "a" * 300) == 1
    assert error_line(capsys.readouterr().err)


# --- delete ----------------------------------------------------------------------------------


def test_delete_running_without_force_refuses(
        populated: StateStore, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(root, "delete", "alpha") == 1
    assert (error_line(capsys.readouterr().err)
            == "cannot delete container alpha that is not stopped: running")
    assert populated.load("alpha").status == "running"


def test_delete_paused_without_force_refuses(
        root: Path, owner: int, capsys: pytest.CaptureFixture[str]) -> None:
    StateStore(root).create(record("p", "paused", pid=5, vm={"foreground_pid": owner}))
    assert run(root, "delete", "p") == 1
    assert (error_line(capsys.readouterr().err)
            == "cannot delete container p that is not stopped: paused")
    assert (root / "p").is_dir()


def test_delete_created_needs_no_force(root: Path, owner: int) -> None:
    # runc deletes (kills) a created container without -f as well
    StateStore(root).create(record("c", "created", pid=5, vm={"foreground_pid": owner}))
    assert run(root, "delete", "c") == 0
    assert not (root / "c").exists()


def test_delete_stopped_and_forced(populated: StateStore, root: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert run(root, "delete", "beta") == 0
    assert run(root, "delete", "gamma-1.0") == 0  # recorded as created, but its owner is gone
    assert run(root, "delete", "-f", "alpha") == 0
    assert capsys.readouterr() == ("", "")
    assert not (root / "beta").exists()
    assert not (root / "alpha").exists()
    assert run(root, "list", "-q") == 0
    assert capsys.readouterr().out == ""


def test_delete_missing(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(root, "delete", "-f", "nope") == 0
    assert capsys.readouterr().err == ""
    assert run(root, "delete", "nope") == 1
    assert error_line(capsys.readouterr().err) == "container does not exist"


def test_delete_force_cleans_up_a_directory_without_state(root: Path) -> None:
    (root / "half").mkdir(parents=True)
    (root / "half" / "junk").write_text("x")
    assert run(root, "delete", "--force", "half") == 0
    assert not (root / "half").exists()


# --- run (only what fails before a VM boots) -------------------------------------------------


def test_run_rejects_invalid_id(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(root, "run", "a/b") == 1
    assert error_line(capsys.readouterr().err) == "invalid container id format: a/b"


@pytest.mark.parametrize("detach", [[], ["-d"]])
def test_run_with_missing_bundle(detach: list[str], root: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert run(root, "run", *detach, "-b", str(tmp_path / "nope"), "c1") == 1
    assert (error_line(capsys.readouterr().err)
            == f"chdir {tmp_path / 'nope'}: no such file or directory")
    assert not root.exists()


def test_run_without_guest_image_and_auto_build_off(
        root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    write_spec(bundle, default_spec(["true"], terminal=False))
    monkeypatch.setenv("RUNM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RUNM_AUTO_BUILD", "0")
    assert run(root, "run", "-b", str(bundle), "c1") == 1
    assert "guest image not found" in error_line(capsys.readouterr().err)
    assert not (root / "c1").exists()


# --- detached-container verbs on containers that are not running -----------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["start", "beta"], "cannot start a container that has stopped"),
        (["start", "nope"], "container does not exist"),
        (["kill", "beta"], "container not running"),
        (["kill", "beta", "SIGFOO"], 'unknown signal "SIGFOO"'),
        (["kill", "beta", "0"], 'unknown signal "0"'),
        (["pause", "beta"], "container not running"),
        (["resume", "gamma-1.0"], "container not running"),
        (["ps", "nope"], "container does not exist"),
    ],
)
def test_verbs_on_stopped_or_missing_containers(
        argv: list[str], message: str, populated: StateStore, root: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert run(root, *argv) == 1
    assert error_line(capsys.readouterr().err) == message


def test_exec_in_stopped_container(root: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    write_spec(bundle, default_spec(["sh"]))
    StateStore(root).create(ContainerRecord(id="s", bundle=str(bundle), rootfs="",
                                            status="stopped"))
    assert run(root, "exec", "s", "true") == 1
    assert error_line(capsys.readouterr().err) == "cannot exec in a stopped container"


def exec_args(options: list[str], command: list[str]) -> object:
    """`runm exec [options] <id> [command...]`: options go before the id, as with runc."""
    return cli.build_parser().parse_args(["exec", *options, "c", *command])


def test_exec_options_after_the_id_belong_to_the_command() -> None:
    args = cli.build_parser().parse_args(["exec", "c", "ls", "-e", "x"])
    assert args.command == ["ls", "-e", "x"]  # type: ignore[attr-defined]
    assert args.env is None  # type: ignore[attr-defined]


def test_exec_process_starts_from_the_container_process(tmp_path: Path) -> None:
    write_spec(tmp_path, default_spec(["sh"]))
    base = default_spec()["process"]
    args = exec_args(["-e", "A=1", "--cwd", "/tmp", "-u", "1000:100", "-g", "7",
                      "--cap", "CAP_SYS_ADMIN", "--no-new-privs", "-t"], ["ls", "-l"])
    process = verbs.exec_process(args, str(tmp_path))  # type: ignore[arg-type]
    assert process["args"] == ["ls", "-l"]
    assert process["terminal"] is True
    assert process["env"] == [*base["env"], "A=1"]
    assert process["cwd"] == "/tmp"
    assert process["user"] == {"uid": 1000, "gid": 100, "additionalGids": [7]}
    assert process["noNewPrivileges"] is True
    for kind in ("bounding", "effective", "permitted"):
        assert "CAP_SYS_ADMIN" in process["capabilities"][kind]
        assert set(base["capabilities"][kind]) <= set(process["capabilities"][kind])
    assert process["capabilities"]["ambient"] == base["capabilities"]["ambient"]


def test_exec_process_defaults(tmp_path: Path) -> None:
    write_spec(tmp_path, default_spec(["sh"]))
    base = default_spec()["process"]
    process = verbs.exec_process(exec_args(["-u", "5"], ["id"]),  # type: ignore[arg-type]
                                 str(tmp_path))
    assert process["terminal"] is False
    assert process["user"] == {"uid": 5, "gid": 0}
    assert process["cwd"] == base["cwd"]
    assert process["env"] == base["env"]


def test_exec_process_from_a_process_file(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text(json.dumps({"args": ["id"], "cwd": "/"}))
    args = exec_args(["-p", str(tmp_path / "p.json")], [])
    assert verbs.exec_process(args, "/nonexistent") == {  # type: ignore[arg-type]
        "args": ["id"], "cwd": "/"}


@pytest.mark.parametrize(
    ("content", "options", "command", "message"),
    [
        (None, ["-p", "{dir}/missing.json"], [], "open {dir}/missing.json: No such file"),
        ("{bad", ["-p", "{dir}/p.json"], [], "parsing {dir}/p.json: invalid JSON"),
        ("[]", ["-p", "{dir}/p.json"], [], "parsing {dir}/p.json: the process must be a JSON"),
        ('{"args": []}', ["-p", "{dir}/p.json"], [], "args must not be empty"),
        (None, [], [], "exec args cannot be empty"),
        (None, ["-u", "bob"], ["true"], "invalid user 'bob': use UID[:GID]"),
    ],
)
def test_exec_process_errors(content: str | None, options: list[str], command: list[str],
                             message: str, tmp_path: Path) -> None:
    write_spec(tmp_path, default_spec(["sh"]))
    if content is not None:
        (tmp_path / "p.json").write_text(content)
    args = exec_args([o.format(dir=tmp_path) for o in options], command)
    with pytest.raises(cli.RunmError) as info:
        verbs.exec_process(args, str(tmp_path))  # type: ignore[arg-type]
    assert info.value.message.startswith(message.format(dir=tmp_path))


def test_exec_process_without_readable_bundle_config(tmp_path: Path) -> None:
    with pytest.raises(cli.RunmError, match=r"reading the container's config.json"):
        verbs.exec_process(exec_args([], ["true"]), str(tmp_path))  # type: ignore[arg-type]


def test_ps_of_stopped_container_lists_nothing(
        populated: StateStore, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(root, "ps", "beta") == 0
    assert capsys.readouterr().out == "PID\n"
    assert run(root, "ps", "--format", "json", "beta") == 0
    assert json.loads(capsys.readouterr().out) == []


@pytest.mark.parametrize(
    ("raw", "signum"),
    [("9", 9), ("KILL", 9), ("SIGKILL", 9), ("sigterm", 15), ("term", 15), ("HUP", 1)],
)
def test_parse_signal_accepts_runc_spellings(raw: str, signum: int) -> None:
    assert verbs.parse_signal(raw) == signum


@pytest.mark.parametrize("raw", ["0", "65", "999", "SIGNOPE", "", "-9"])
def test_parse_signal_rejects_unknown_signals(raw: str) -> None:
    with pytest.raises(cli.RunmError, match="unknown signal"):
        verbs.parse_signal(raw)


# --- guest path ------------------------------------------------------------------------------


def test_guest_path_without_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RUNM_DATA_DIR", str(tmp_path))
    assert cli.main(["guest", "path"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    message = error_line(captured.err)
    assert message.startswith(f"guest image not found in {tmp_path / 'guest'}")
    assert "runm guest build" in message


# --- logging options -------------------------------------------------------------------------


def test_log_file_in_json_format(root: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "runm.log"
    assert run(root, "--log", str(log), "--log-format", "json", "state", "nope") == 1
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(entries) == 1
    entry = entries[0]
    assert set(entry) == {"level", "msg", "time"}
    assert entry["level"] == "error"
    assert entry["msg"] == "container does not exist"
    assert entry["time"].endswith("Z")
    when = datetime.datetime.fromisoformat(entry["time"])
    assert abs((datetime.datetime.now(datetime.UTC) - when).total_seconds()) < 60
    # runc's fatal(): with a log file the message also goes to stderr, plainly
    assert capsys.readouterr().err == "container does not exist\n"


def test_log_file_in_text_format_appends(root: Path, tmp_path: Path) -> None:
    log = tmp_path / "runm.log"
    log.write_text("earlier line\n")
    assert run(root, "--log", str(log), "state", "nope") == 1
    lines = log.read_text().splitlines()
    assert lines[0] == "earlier line"
    assert re.fullmatch(r'time="\S+Z" level=error msg="container does not exist"', lines[1])


@pytest.mark.parametrize("target", ["-", "/dev/stderr"])
def test_log_to_stderr_aliases(target: str, root: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    assert run(root, "--log", target, "--log-format", "json", "state", "nope") == 1
    err = capsys.readouterr().err
    assert json.loads(err)["msg"] == "container does not exist"  # once, not twice


def test_error_on_a_terminal_looks_like_runc(root: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(logs, "stderr_is_terminal", lambda: True)
    assert run(root, "state", "nope") == 1
    assert capsys.readouterr().err == "ERRO[0000] container does not exist\n"


def test_debug_flag_sets_the_log_level(root: Path) -> None:
    assert run(root, "--debug", "list", "-q") == 0
    assert logging.getLogger().level == logging.DEBUG
    assert run(root, "list", "-q") == 0
    assert logging.getLogger().level == logging.WARNING


def test_keyboard_interrupt_exits_130_quietly(
        root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_list", interrupted)
    assert run(root, "list") == 130
    assert capsys.readouterr() == ("", "")


# --- cli.progress ----------------------------------------------------------------------------


class TtyStringIO(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_step_and_done() -> None:
    stream = io.StringIO()
    progress = Progress(stream)
    progress.started -= 5  # as if the work had begun five seconds ago
    progress.step("fetching packages")
    assert stream.getvalue() == "\r\x1b[2Krunm guest image: fetching packages (5s)"
    progress.step("building")
    assert stream.getvalue().endswith("\r\x1b[2Krunm guest image: building (5s)")
    progress.done()
    assert stream.getvalue().endswith("(5s)\r\x1b[2K")  # the status line is cleared


def test_progress_done_without_steps_writes_nothing() -> None:
    stream = io.StringIO()
    Progress(stream).done()
    assert stream.getvalue() == ""


def test_progress_without_stream_is_silent(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress(None)
    progress.step("x")
    progress.done()
    assert capsys.readouterr() == ("", "")


def test_progress_for_stderr_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert Progress.for_stderr().stream is None
    tty = TtyStringIO()
    monkeypatch.setattr("sys.stderr", tty)
    progress = Progress.for_stderr()
    assert progress.stream is tty
    progress.step("s")
    assert "runm guest image: s" in tty.getvalue()


# --- cli.logs --------------------------------------------------------------------------------


def log_record(level: int, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("runm", level, __file__, 1, msg, args, None)


@pytest.mark.parametrize(
    ("level", "name", "short"),
    [(logging.CRITICAL, "fatal", "FATA"), (logging.ERROR, "error", "ERRO"),
     (logging.WARNING, "warning", "WARN"), (logging.INFO, "info", "INFO"),
     (logging.DEBUG, "debug", "DEBU"), (5, "info", "INFO")],
)
def test_formatters_use_logrus_level_names(level: int, name: str, short: str) -> None:
    rec = log_record(level, "hello %s", "world")
    assert json.loads(logs.JsonFormatter().format(rec))["level"] == name
    assert logs.TextFormatter(terminal=True).format(rec) == f"{short}[0000] hello world"
    assert f" level={name} " in logs.TextFormatter().format(rec)


def test_text_formatter_quotes_the_message() -> None:
    text = logs.TextFormatter().format(log_record(logging.ERROR, 'say "hi"\nbye'))
    m = re.fullmatch(r'time="(\S+)" level=error msg=(.*)', text)
    assert m
    assert json.loads(m.group(2)) == 'say "hi"\nbye'
    assert "\n" not in text  # one record, one line
    assert m.group(1).endswith("Z")


def test_json_formatter_is_one_json_object_per_record() -> None:
    line = logs.JsonFormatter().format(log_record(logging.WARNING, "disk %d%% full", 99))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["msg"] == "disk 99% full"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", entry["time"])


def test_logging_fatal_to_stderr_only_once(capsys: pytest.CaptureFixture[str]) -> None:
    logging_ = logs.Logging(None, "json", debug=False)
    assert logging_.to_stderr
    logging_.fatal("boom")
    err = capsys.readouterr().err
    assert err.count("boom") == 1
    assert json.loads(err)["level"] == "error"

