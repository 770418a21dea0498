"""The CLI as a user meets it: one sentence naming the cause for each mistake, watch's loose ends, the help.

Real processes, real files, the real upstream server and the real scans; nothing is mocked but the
absence of `requests` (hidden from imports in the child process) and RunPod's clock of a time-out.
"""

import argparse
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import EXAMPLE_CT, JPEG2000_SERIES, RUNPOD_KEY, UNCOMPRESSED_SERIES
from SegmentationMachineLib.cli.common import parse_presets
from SegmentationMachineLib.cli.main import _configure_logging, build_parser
from SegmentationMachineLib.cloud.pods import PodsError, RunPodRest
from SegmentationMachineLib.dicom.phantom import make_phantom, write_ct_series

CLI = [sys.executable, "-m", "SegmentationMachineLib.cli"]
# The child process cannot import requests, as after a bare `pip install segmentation-machine`.
WITHOUT_REQUESTS = """
import runpy, sys
class NoRequests:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "requests":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoRequests())
sys.argv[0] = "segmentation-machine"
runpy.run_module("SegmentationMachineLib.cli", run_name="__main__")
"""


def run_cli(*args, env=None, timeout=300, prefix=CLI):
    return subprocess.run(prefix + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def one_sentence(result, sentence: str, status: int = 2) -> str:
    """The run ended with status and exactly one line on stderr, which holds sentence."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status, result.stderr
    assert len(lines) == 1 and sentence in lines[0] and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture
def read_only(tmp_path):
    """A folder nobody may write in, root included (the tests and CI run as root): immutable (chattr +i)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
    elif shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("no way to make a folder read-only for root here (chattr +i needs ext4 and CAP_LINUX_IMMUTABLE)")
    try:
        with pytest.raises(OSError):
            (folder / "probe").write_text("x")
        yield folder
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


# -- help ------------------------------------------------------------------------------------------

def _commands(parser, name="segmentation-machine"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _commands(sub, f"{name} {sub_name}")


def test_every_option_and_argument_is_described_and_every_help_ends_with_an_example():
    commands = dict(_commands(build_parser()))
    assert {"segmentation-machine watch", "segmentation-machine pod up", "segmentation-machine pod down"} <= set(commands)
    for name, parser in commands.items():
        actions = [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
        for commands_action in set(parser._actions) - set(actions):  # each subcommand's line in the list
            actions += getattr(commands_action, "_choices_actions", [])
        undescribed = [a.option_strings or a.dest for a in actions if not (a.help or "").strip()]
        assert undescribed == [], f"{name}: {undescribed} have no help"
        epilog = (parser.epilog or "").strip().splitlines()
        assert epilog and epilog[0].startswith("example") and "segmentation-machine" in epilog[-1], name
    shown = run_cli("pod", "down", "--help")
    assert shown.returncode == 0 and shown.stdout.rstrip().endswith("segmentation-machine pod down --all")


def test_preset_is_case_insensitive(tmp_path):
    assert parse_presets("BONE, Skin") == ["bone", "skin"]
    listed = run_cli("model", UNCOMPRESSED_SERIES, "--list", "--preset", "BONE", "--out", tmp_path)
    assert listed.returncode == 0 and listed.stdout.startswith("1. CT"), listed.stderr


# -- one sentence that names the cause ---------------------------------------------------------------

@pytest.mark.parametrize("args, sentence", [
    (["watch", "{tmp}/afile", "--out", "{tmp}/out"], "The inbox {tmp}/afile is a file, not a folder"),
    (["watch", "{tmp}", "--out", "{tmp}/out", "--settle", "-1"], "--settle and --hold are waiting times"),
    # Not a number, or no end: no file ever settled, and `watch --once` waited for ever.
    (["watch", "{tmp}", "--out", "{tmp}/out", "--settle", "nan"], "--settle and --hold are waiting times"),
    (["watch", "{tmp}", "--out", "{tmp}/out", "--hold", "inf", "--once"], "--settle and --hold are waiting times"),
    (["watch", "{tmp}", "--out", "{tmp}/afile/out"],
     "Cannot write in {tmp}/afile/out (Not a directory): choose a folder you can write to with --out."),
    (["watch", "{tmp}", "--out", "{tmp}/out", "--state", "{tmp}/afile/state"],
     "Cannot write in {tmp}/afile/state (Not a directory): choose a folder you can write to with --state."),
    (["watch", "{tmp}/inbox", "--out", "{tmp}/out", "--state", "{tmp}/state"],  # a journal a crash left damaged
     "The inbox could not open its records of what it loaded, in {tmp}/state (file is not a database)"),
    (["model", str(UNCOMPRESSED_SERIES), "--out", "{tmp}/afile/x"], "Cannot write in {tmp}/afile/x (Not a directory)"),
    (["model", "{tmp}/cut.dcm", "--out", "{tmp}/out"],
     "{tmp}/cut.dcm is not a usable image: truncated (its pixel data is shorter than its size says); copy it again"),
    (["model", "{tmp}/broken.zip", "--out", "{tmp}/out"],
     "Nothing could be unpacked from {tmp}/broken.zip: the archive cannot be read"),
    (["model", str(EXAMPLE_CT), "--series", "2", "--out", "{tmp}/out"],
     "--series does not apply to example_ct.nii.gz: a NIfTI/NRRD file holds one volume"),
    (["export", str(EXAMPLE_CT), "--out", "{tmp}/out"],
     f"{EXAMPLE_CT} looks like a scan, not a labelmap (2598 different values from -1207 to 3382"),
])
def test_a_mistake_is_one_sentence_naming_its_cause(shared_data, tmp_path, args, sentence):
    (tmp_path / "afile").write_text("a file where a folder belongs")
    cut = (UNCOMPRESSED_SERIES / "01.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(cut[:len(cut) // 2])
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    (tmp_path / "inbox").mkdir()
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "journal.sqlite").write_bytes(b"not a database " * 100)
    result = run_cli(*[a.format(tmp=tmp_path) for a in args])
    one_sentence(result, sentence.format(tmp=tmp_path))
    assert "Loaded" not in result.stdout  # found before any work
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_read_only_out_is_found_before_any_work(shared_data, read_only, tmp_path):
    model = run_cli("model", UNCOMPRESSED_SERIES, "--out", read_only / "exports")
    one_sentence(model, f"Cannot write in {read_only}/exports (")
    assert "Loaded" not in model.stdout and "Segmented" not in model.stdout
    (tmp_path / "inbox").mkdir()
    for args, option in ((["--out", read_only], "--out"), (["--out", tmp_path / "out", "--state", read_only], "--state")):
        watch = run_cli("watch", tmp_path / "inbox", "--once", *args)
        one_sentence(watch, f"Cannot write in {read_only} (")
        assert watch.stderr.strip().endswith(f"choose a folder you can write to with {option}.")


def test_a_zip_given_to_model_is_read_like_watch_reads_one(shared_data, tmp_path):
    import zipfile

    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as package:
        for path in sorted(UNCOMPRESSED_SERIES.iterdir()):
            package.write(path, f"study/{path.name}")
        package.writestr("../escape.dcm", b"outside")
    temp = tmp_path / "temp"  # a killed run's unpacked copy (patient data) stays in it: removed once a day old
    killed, running = temp / "segmentation-machine-zip-killed", temp / "segmentation-machine-zip-running"
    for folder in (killed, running):
        (folder / "unpacked").mkdir(parents=True)
    os.utime(killed, (time.time() - 25 * 3600,) * 2)
    result = run_cli("model", archive, "--list", "--out", tmp_path / "out", env={"TMPDIR": str(temp)})
    assert result.returncode == 0, result.stderr
    assert "Unpacked 3 file(s)" in result.stdout and "1. CT 'series 2', 3 slices of 512x512" in result.stdout
    assert "Skipped ../escape.dcm in study.zip: its path leads outside the archive's folder" in result.stderr
    assert not (tmp_path / "escape.dcm").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["study.zip", "temp"]
    assert list(temp.iterdir()) == [running]


def test_a_bare_install_runs_the_main_job_and_names_the_extra_for_dicomweb_and_listen(shared_data, tmp_path):
    """`pip install -e .` has neither requests nor pynetdicom: `model` of a folder ended in 'No module named
    requests', `listen` in pynetdicom's."""
    bare = [sys.executable, "-c", WITHOUT_REQUESTS.replace('== "requests"', 'in ("requests", "pynetdicom")')]
    listed = run_cli("model", UNCOMPRESSED_SERIES, "--list", prefix=bare)
    assert listed.returncode == 0 and "1. CT 'series 2', 3 slices" in listed.stdout, listed.stderr
    one_sentence(run_cli("model", "dicomweb+https://pacs.example/dicom-web", "--study", "1.2.3", prefix=bare),
                 "DICOMweb needs the PACS extra: pip install -e '.[pacs]' in the SegmentationMachine folder.")
    one_sentence(run_cli("listen", "--state", tmp_path / "state", "--out", tmp_path / "out", prefix=bare),
                 "listen is a DICOM node, which needs pynetdicom: pip install -e '.[pacs]' in the SegmentationMachine")


def test_pod_without_the_cloud_extra(tmp_path):
    result = run_cli("pod", "list", env={"RUNPOD_API_KEY": RUNPOD_KEY},
                     prefix=[sys.executable, "-c", WITHOUT_REQUESTS])
    one_sentence(result, "The pod commands need the cloud extra: pip install -e '.[cloud]' in the SegmentationMachine "
                         "folder.")


def test_runpod_refused_or_unknown_is_said_at_once_with_the_url_and_the_cause(monkeypatch):
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    for url, cause in ((f"http://127.0.0.1:{port}/v2", "the connection was refused"),
                       ("http://runpod.invalid/v2", "its name runpod.invalid was not found (DNS)")):
        monkeypatch.setenv("RUNPOD_REST_URL", url)
        sleeps = []
        with pytest.raises(PodsError) as error:
            RunPodRest(RUNPOD_KEY, sleep=sleeps.append).pods()
        assert str(error.value).startswith(f"Cannot reach RunPod at {url}: {cause};") and sleeps == []
        assert RUNPOD_KEY not in str(error.value)
    result = run_cli("pod", "gpus", env={"RUNPOD_REST_URL": f"http://127.0.0.1:{port}/v2", "RUNPOD_API_KEY": RUNPOD_KEY},
                     timeout=30)
    one_sentence(result, f"Cannot reach RunPod at http://127.0.0.1:{port}/v2: the connection was refused")
    assert result.stdout == ""  # no table header above the sentence


def test_third_party_info_lines_never_reach_the_user(capsys):
    _configure_logging()
    try:
        for name in ("httpx", "numexpr.utils", "pydicom"):
            logging.getLogger(name).info("noise from %s", name)
        logging.getLogger("pydicom").warning("noise: Invalid value for VR IS: 'xx'")  # a file's odd value
        logging.getLogger("segmentation-machine").info("our own line")
    finally:
        logging.basicConfig(force=True)
    err = capsys.readouterr().err
    assert "our own line" in err and "noise" not in err


def test_pydicoms_words_on_a_cut_file_never_reach_the_user_whenever_it_is_imported(tmp_path, shared_data):
    """pydicom sets its logger to WARNING when imported: imported after the CLI set it to ERROR (as `model` does),
    its "End of file reached before delimiter" came before our own sentence."""
    files = sorted(JPEG2000_SERIES.iterdir())[:3]
    for source in files:
        shutil.copy(source, tmp_path)
    cut = tmp_path / files[1].name
    cut.chmod(0o644)
    os.truncate(cut, cut.stat().st_size // 2)
    result = run_cli("model", tmp_path, "--list")
    assert result.returncode == 0 and "delimiter" not in result.stderr, result.stderr
    assert f"skipped {cut}: truncated (the file ends before its pixel data does)" in result.stdout


def test_a_missing_slice_is_our_sentence_not_itks(tmp_path):
    phantom = make_phantom(shape=(12, 64, 64), pixel_spacing=3.0, slice_spacing=3.0)
    kept = [k for k in range(12) if k != 6]  # slice 7 never arrived
    write_ct_series(tmp_path / "ct", phantom.hu[kept], 3.0, [(-94.5, -94.5, k * 3.0) for k in kept], "gap")
    result = run_cli("model", tmp_path / "ct", "--out", tmp_path / "out", "--format", "stl", "--quiet")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("segmentation-machine: ") for line in lines), result.stderr  # not ITK's own words
    assert any("a slice is probably missing" in line for line in lines), result.stderr


def test_highdicoms_remarks_on_a_patient_name_never_reach_the_user(shared_data, tmp_path):
    pytest.importorskip("highdicom")
    result = run_cli("model", UNCOMPRESSED_SERIES, "--out", tmp_path, "--format", "seg", "--quiet")
    assert result.returncode == 0 and result.stderr == "", result.stderr  # "JANCT000": a one-part name


# -- server --------------------------------------------------------------------------------------------

@pytest.fixture
def server_installed():
    pytest.importorskip("nnInteractive")
    pytest.importorskip("torch")


@pytest.mark.parametrize("missing", ["nnInteractive", "nnInteractive.inference.server", "uvicorn"])
def test_server_without_the_server_extra(tmp_path, missing):
    """Nothing of nnInteractive, or only its prompt client (the [ai] extra: nnInteractive.inference.remote), whose
    namespace package passed the check before uvicorn's traceback."""
    # sys.modules[name] = None: importing fails and importlib.util.find_spec answers None, as where it is not installed
    without = ["-c", f'import runpy, sys; sys.modules["{missing}"] = None; sys.argv[0] = "segmentation-machine"; '
                     'runpy.run_module("SegmentationMachineLib.cli", run_name="__main__")']
    one_sentence(run_cli("server", "--device", "cpu", prefix=[sys.executable, *without]),
                 "The nnInteractive server is not installed: pip install -e '.[server]' in the SegmentationMachine")


@pytest.mark.parametrize("args, sentence", [
    (["--model-dir", "{tmp}/nowhere"], "--model-dir {tmp}/nowhere is not a folder"),
    (["--model-dir", "{tmp}", "--fold", "3"], "{tmp} has no fold_3 folder (found: fold_0): choose the fold with --fold"),
    (["--model-dir", "{tmp}"], "{tmp} is not an nnInteractive model folder"),
])
def test_server_refuses_a_model_folder_that_is_not_one(server_installed, tmp_path, args, sentence):
    (tmp_path / "fold_0").mkdir()
    result = run_cli("server", *[a.format(tmp=tmp_path) for a in args], "--device", "cpu")
    one_sentence(result, sentence.format(tmp=tmp_path))
    assert "API key" not in result.stdout  # no key is handed out for a server that never starts


def test_server_on_cuda_without_a_gpu(server_installed, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    one_sentence(run_cli("server", "--device", "cuda"), "--device cuda, but torch sees no CUDA GPU here")


@pytest.mark.parametrize("flag", [[], ["--no-torch-compile"]])
def test_server_on_cuda_runs_without_torch_compile_where_no_c_compiler_or_python_headers_are_found(
        server_installed, tmp_path, monkeypatch, capsys, flag):
    """Upstream compiles by default, and Triton needs a C compiler and Python's headers for it (docker/README.md)."""
    from SegmentationMachineLib.cli import server

    commands = []

    class Exited:  # the server's process, as if it stopped at once (nothing runs on a GPU here)
        returncode = 0

        def __init__(self, command, **kwargs):
            commands.append(command)
            self.stdout = io.BytesIO()  # it said nothing

        def poll(self):
            return 0

        wait = poll

    (tmp_path / "cc").write_text("#!/bin/sh\n")
    (tmp_path / "cc").chmod(0o755)
    monkeypatch.setattr(server, "_default_device", lambda: "cuda")
    monkeypatch.setattr(server.subprocess, "Popen", Exited)
    monkeypatch.setenv("SM_NNI_API_KEY", "test-key-0123456789")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the official weights' list from their cache: nothing to reach
    monkeypatch.delenv("CC", raising=False)
    headers = server.sysconfig.get_paths()
    for with_compiler, with_headers in ((True, True), (False, True), (True, False)):
        monkeypatch.setenv("PATH", str(tmp_path) if with_compiler else str(tmp_path / "empty"))
        monkeypatch.setattr(server.sysconfig, "get_paths", lambda: headers if with_headers else {
            **headers, "include": str(tmp_path / "no-python-dev")})
        server.run_server(build_parser().parse_args(["server", "--device", "cuda", *flag]))
    said = capsys.readouterr().out
    with_both, without_compiler, without_headers = commands
    assert ("--no-torch-compile" in with_both) == bool(flag)
    assert "--no-torch-compile" in without_compiler and "--no-torch-compile" in without_headers
    assert said.count("No C compiler found, which torch.compile needs") == (0 if flag else 1)
    assert said.count("No Python headers found, which torch.compile needs") == (0 if flag else 1)


def lines_until_ready(server) -> list:
    """The server's lines up to its "Ready" one."""
    lines = []
    deadline = time.monotonic() + 120
    while not (lines and lines[-1].startswith("Ready")):
        assert time.monotonic() < deadline and server.poll() is None, lines
        lines.append(server.stdout.readline().strip())
    return lines


# Hugging Face out of reach, whatever this machine's environment says (a proxy would skip the check).
NO_HUB = {"HF_ENDPOINT": "https://hub.invalid", "HF_HUB_OFFLINE": "", **dict.fromkeys(
    ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"), "")}


def test_server_says_ready_only_once_it_answers(server_installed, tmp_path):
    from nninteractive_model import write_model_folder
    from nninteractive_server import free_port

    model = write_model_folder(tmp_path / "model")
    port = free_port()
    server = subprocess.Popen(CLI + ["server", "--model-dir", str(model), "--device", "cpu", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env={**os.environ, "SM_NNI_API_KEY": "test-key-0123456789", "PYTHONUNBUFFERED": "1"})
    try:
        lines = lines_until_ready(server)
        started = next(i for i, line in enumerate(lines) if line.startswith("Starting the nnInteractive server"))
        assert lines[-1] == f"Ready: the nnInteractive server answers on http://127.0.0.1:{port}; Ctrl-C stops it."
        assert started < len(lines) - 1 and not any("API key" in line for line in lines)  # the key came from us
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:  # at once: no retry
            assert answer.status == 200
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(30) == 0


def test_server_without_the_weights_and_without_hugging_face_is_one_sentence(server_installed, tmp_path):
    """Upstream asked Hugging Face for its model list five times over half a minute, printing each retry, then
    exited with a traceback."""
    result = run_cli("server", "--device", "cpu", env={**NO_HUB, "NNINTERACTIVE_MODEL_DIR": str(tmp_path / "none")})
    one_sentence(result, "The official nnInteractive weights are not on this machine and Hugging Face cannot be "
                         "reached (its name hub.invalid was not found (DNS))")


def test_server_offline_starts_from_the_weights_downloaded_before_without_retrying(server_installed, tmp_path):
    """Upstream's layout of downloaded weights: NNINTERACTIVE_MODEL_DIR/models.json and models/<id>/ (here the
    tests' model folder under the official id)."""
    from nninteractive_model import write_model_folder
    from nninteractive_server import free_port

    root = tmp_path / "weights"
    write_model_folder(root / "models" / "nnInteractive_v1.0")
    (root / "models.json").write_text(json.dumps({"schema_version": 1, "models": [
        {"id": "nnInteractive_v1.0", "display_name": "nnInteractive v1.0", "path": "nnInteractive_v1.0"}]}))
    port = free_port()
    server = subprocess.Popen(CLI + ["server", "--device", "cpu", "--port", str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "SM_NNI_API_KEY": "test-key-0123456789", "PYTHONUNBUFFERED": "1",
                                   **NO_HUB, "NNINTERACTIVE_MODEL_DIR": str(root)})
    try:
        lines = lines_until_ready(server)
        assert lines[0] == (f"Hugging Face cannot be reached (its name hub.invalid was not found (DNS)): the server "
                            f"uses the weights already in {root}.")
        assert not any("Retry" in line or "torch.compile" in line for line in lines), lines
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(30) == 0

    # A model named that is there (the pod image names its baked one) needs no list: upstream looks nothing up.
    from SegmentationMachineLib.cli import server as ours

    (root / "models.json").unlink()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**NO_HUB, "NNINTERACTIVE_MODEL_DIR": str(root)}.items():
            patch.setenv(name, value)
        ours._official_weights_at_hand("nnInteractive_v1.0")
        with pytest.raises(ours.UserError, match="weights are not on this machine"):
            ours._official_weights_at_hand("nnInteractive_v2.0")


def test_a_term_between_popen_and_the_assignment_still_stops_upstreams_server(server_installed, monkeypatch):
    """A signal that came between Popen's return and the assignment of its result would leave upstream's server
    running after we exit, holding the GPU and the port: server.py starts it with the signals held."""
    from SegmentationMachineLib.cli import server

    started = []

    class Started:  # Popen's stand-in: the signal arrives before Popen's caller has the object
        returncode = None

        def __init__(self, command, **options):
            self.stdout, self.stopped = io.BytesIO(), False
            started.append(self)
            signal.raise_signal(signal.SIGTERM)

        def poll(self):
            return self.returncode

        def terminate(self):
            self.stopped, self.returncode = True, -signal.SIGTERM

        def wait(self, timeout=None):
            return self.returncode

    monkeypatch.setattr(server, "_default_device", lambda: "cpu")
    monkeypatch.setattr(server.subprocess, "Popen", Started)
    monkeypatch.setenv("SM_NNI_API_KEY", KEY)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the official weights' list from their cache: nothing to reach
    before = signal.getsignal(signal.SIGTERM)
    try:
        server.run_server(build_parser().parse_args(["server", "--device", "cpu"]))
    finally:
        signal.signal(signal.SIGTERM, before)  # run_server's own handler would outlive the test
    assert len(started) == 1 and started[0].stopped


def test_a_held_signal_whose_handler_is_the_default_ends_the_block_as_ctrl_c_does():
    """The default TERM handler ends the process at once: the caller could not stop what it started."""
    from SegmentationMachineLib.cli.common import signals_held

    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_held():
                signal.raise_signal(signal.SIGTERM)  # held: the process is still here
                known = True
        assert known and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)


class OutOfMemoryServer:
    """`segmentation-machine server` on the tests' model whose every forward pass runs out of CUDA memory."""

    def __init__(self, tmp_path: Path, *options):
        from nninteractive_model import write_model_folder
        from nninteractive_server import free_port, TESTING

        model, self.port, self.key = write_model_folder(tmp_path / "model", out_of_memory=True), free_port(), KEY
        self.url, self.lines = f"http://127.0.0.1:{self.port}", []
        self.process = subprocess.Popen(
            CLI + ["server", "--model-dir", str(model), "--device", "cpu", "--port", str(self.port), *options],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "SM_NNI_API_KEY": self.key, "PYTHONUNBUFFERED": "1",
                 "PYTHONPATH": os.pathsep.join([str(TESTING), os.environ.get("PYTHONPATH", "")])})

    def read_until(self, start: str, count: int = 1) -> list:
        """Its lines until count of them start with start."""
        while sum(line.startswith(start) for line in self.lines) < count:
            line = self.process.stdout.readline()
            assert line or self.process.poll() is None, self.lines
            self.lines.append(line.strip())
        return self.lines

    def failing_prompt(self):
        """A prompt that runs out of memory, from a session of its own: the server answers HTTP 500."""
        import httpx
        from SegmentationMachineLib.prompts.remote import GuardedSession

        session = GuardedSession(self.url, self.key, read_timeout=60)
        image = np.random.default_rng(0).integers(-100, 100, (1, 64, 64, 64), np.int16)  # upstream refuses all zero
        session.set_image(image, {"spacing": [1, 1, 1]})
        session.set_target_buffer(np.zeros((64, 64, 64), np.uint8))
        session.reset_interactions()
        with pytest.raises(httpx.HTTPStatusError) as failed:
            session.add_point_interaction((32, 32, 32), include_interaction=True)
        assert failed.value.response.status_code == 500, failed.value.response.text
        return session

    def stop(self):
        self.process.send_signal(signal.SIGINT)
        self.lines += self.process.communicate(timeout=30)[0].splitlines()
        return self.process.returncode


KEY = "test-key-0123456789"


def test_server_restarts_the_upstream_server_after_a_cuda_out_of_memory(server_installed, tmp_path):
    """The real server answers again after a CUDA out of memory, but a large structure's prompt takes about twice as
    long until it restarts (benchmarks/gpu_out_of_memory.py on an H100); upstream's log says only the traceback. So
    ours restarts it: the session that failed is lost (a client reconnects), and a new one works."""
    from SegmentationMachineLib.cli.server import RESTART_NOTE
    from SegmentationMachineLib.prompts.remote import GuardedSession

    server = OutOfMemoryServer(tmp_path)
    try:
        server.read_until("Ready")
        failed = server.failing_prompt()
        lines = server.read_until("Ready", 2)
        assert lines[lines.index(RESTART_NOTE) - 1].startswith("torch.OutOfMemoryError: CUDA out of memory")
        from nnInteractive.inference.remote.remote_session import SessionExpiredError

        with pytest.raises(SessionExpiredError):  # what our client resumes from, by itself
            failed.reset_interactions()
        again = GuardedSession(server.url, server.key, read_timeout=60)
        again.set_image(np.ones((1, 8, 8, 8), np.int16), {"spacing": [1, 1, 1]})
        again.close()
    finally:
        assert server.stop() == 0
    assert server.lines.count(RESTART_NOTE) == 1 and "Traceback" not in "\n".join(server.lines[-3:])


def test_server_kept_after_a_cuda_out_of_memory_says_what_that_leaves_behind(server_installed, tmp_path):
    from SegmentationMachineLib.cli.server import OUT_OF_MEMORY_NOTE, RESTART_NOTE

    server = OutOfMemoryServer(tmp_path, "--no-restart-on-out-of-memory")
    try:
        server.read_until("Ready")
        server.failing_prompt().close()
    finally:
        assert server.stop() == 0
    assert server.lines.count(OUT_OF_MEMORY_NOTE) == 1 and RESTART_NOTE not in server.lines
    assert server.lines[server.lines.index(OUT_OF_MEMORY_NOTE) - 1].startswith("torch.OutOfMemoryError: CUDA out of memory")
    assert sum(line.startswith("Ready") for line in server.lines) == 1


# -- watch's loose ends --------------------------------------------------------------------------------

def tilted_series(folder: Path):
    """Four small slices leaning 45°, more than a gantry tilts: a series that fails, in a sentence."""
    hu = np.full((4, 16, 16), 40.0)
    write_ct_series(folder, hu, 1.0, [(k * 2.0, 0.0, k * 2.0) for k in range(4)], "tilted")


def watch_once(inbox: Path, outbox: Path, *options):
    return run_cli("watch", inbox, "--out", outbox, "--once", "--settle", "0.2", "--hold", "0", *options)


def test_watch_once_status_failures_skipped_files_and_duplicates(shared_data, tmp_path):
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    (inbox / "notes.txt").write_text("not DICOM")
    first = watch_once(inbox, outbox, "--format", "stl", "--smoothing", "0", "--merged-stl")
    assert first.returncode == 0, first.stderr
    assert json.loads((outbox / "status.json").read_text())["series"] == []  # there before any series
    assert first.stderr.count("notes.txt: not a DICOM file") == 1

    shutil.copytree(UNCOMPRESSED_SERIES, inbox / "ct")
    tilted_series(inbox / "tilted")
    second = watch_once(inbox, outbox, "--format", "stl", "--smoothing", "0", "--merged-stl")
    assert second.returncode == 1, second.stderr  # a series failed: a script learns of it
    assert "notes.txt" not in second.stderr  # reported once, not on every restart
    assert second.stderr.strip().endswith(f"1 series failed (reasons in {outbox / 'status.json'}).")
    states = {s["name"]: s for s in json.loads((outbox / "status.json").read_text())["series"]}
    assert states["CT 'tilted'"]["state"] == "failed" and "more than a CT gantry tilts" in states["CT 'tilted'"]["reason"]
    result = Path(states["CT 'series 2'"]["result"])
    assert sorted(p.name for p in result.iterdir()) == ["Bone.stl", "merged.stl", "report.json"]  # model's options
    report = json.loads((result / "report.json").read_text())
    assert report["input"]["series_uid"] and len(report["input"]["files"]) == 3  # traceable, as model's reports
    assert report["command"]["name"] == "watch" and report["command"]["options"]["format"] == "stl"

    shutil.copytree(UNCOMPRESSED_SERIES, inbox / "ct-again")
    third = watch_once(inbox, outbox)
    assert third.returncode == 0, third.stderr  # what failed before this run was said then
    assert (f"CT 'series 2': 3 file(s) already processed: the same files as an earlier delivery; not processed "
            f"again (result: {result}).") in third.stdout.splitlines()
    assert sorted(p.name for p in outbox.iterdir() if not p.name.startswith(".")) == sorted([result.name, "status.json"])


def test_watch_never_replaces_a_status_file_that_is_not_its_own(tmp_path):
    """An outbox holding the user's own status.json: watch replaced it with its board."""
    (tmp_path / "inbox").mkdir()
    (tmp_path / "outbox").mkdir()
    (tmp_path / "outbox" / "status.json").write_text('{"my": "own file"}')
    one_sentence(watch_once(tmp_path / "inbox", tmp_path / "outbox"),
                 f"{tmp_path / 'outbox' / 'status.json'} is not watch's status file, and watch would replace it")
    assert (tmp_path / "outbox" / "status.json").read_text() == '{"my": "own file"}'


# A library's exception that quotes a header value (pydicom's and highdicom's do), raised while a series loads.
LOAD_QUOTING_THE_HEADER = """
import runpy, sys
import pydicom
from SegmentationMachineLib.dicom import volumes

def load_series(ctx, series):
    header = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    raise ValueError(f"bad value {header.PatientName} for patient {header.PatientID}")

volumes.load_series = load_series
sys.argv[0] = "segmentation-machine"
runpy.run_module("SegmentationMachineLib.cli", run_name="__main__")
"""


def test_an_unexpected_errors_text_stays_in_the_log_never_in_status_json_nor_the_journal(tmp_path):
    """status.json is read by whoever uses the drop folder, and the journal outlives the run: an error that is not the
    user's gets our sentence there; the operator's log and terminal keep the library's words, the patient's name too."""
    import pydicom

    inbox, outbox, log_file = tmp_path / "inbox", tmp_path / "outbox", tmp_path / "watch.log"
    for path in write_ct_series(inbox / "upload", np.full((4, 16, 16), 40.0), 1.0, [(0, 0, 2.0 * k) for k in range(4)],
                                "chest"):
        header = pydicom.dcmread(path)
        header.PatientName, header.PatientID = "Privacy^Jane", "PID-4242"
        header.save_as(path)
    done = run_cli("watch", inbox, "--out", outbox, "--once", "--settle", "0.2", "--hold", "0", "--log", log_file,
                   prefix=[sys.executable, "-c", LOAD_QUOTING_THE_HEADER])
    assert done.returncode == 1, done.stderr
    (entry,) = json.loads((outbox / "status.json").read_text())["series"]
    assert entry["state"] == "failed" and "unexpected error" in entry["reason"] and "log" in entry["reason"]
    journal = b"".join(path.read_bytes() for path in (outbox / ".segmentation-machine").glob("journal.sqlite*"))
    assert entry["reason"].encode() in journal  # the journal holds the failure, in our words
    for value in ("Privacy", "PID-4242", "bad value"):
        assert value not in entry["reason"] and value.encode() not in journal
    assert "ValueError: bad value Privacy^Jane for patient PID-4242" in log_file.read_text()  # the operator's
    assert "bad value Privacy^Jane" in done.stderr and f"CT 'chest': failed: {entry['reason']}" in done.stdout
