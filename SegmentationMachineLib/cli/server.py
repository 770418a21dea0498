"""`segmentation-machine server`: the upstream nnInteractive server, started with a key and stopped cleanly."""

import importlib.util
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from ..core.child import UTF8_CHILD
from ..core.errors import UserError, install_extra
from ..core.files import printable
from .common import examples, signals_held, stop_on_signals

STARTUP_POLL_S = 0.25  # how often the starting server is asked whether it answers
EXIT_POLL_S = 0.5  # how often a running server is looked at for having exited
OUT_OF_MEMORY_NOTE = ("The nnInteractive server ran out of GPU memory on a prompt: it goes on answering, but a large "
                      "structure's prompt takes about twice as long until it is restarted; restart it, on a GPU with "
                      "more memory if such prompts are needed.")
RESTART_NOTE = ("The nnInteractive server ran out of GPU memory on a prompt, which leaves it about half as fast on "
                "large structures: restarting it (clients reconnect by themselves; that prompt needs a GPU with more "
                "memory).")


def add_server_command(commands, common):
    serve = commands.add_parser("server", parents=[common],
                                help="run the upstream nnInteractive server (GPU workstation or pod)",
                                **examples("SM_NNI_API_KEY=... segmentation-machine server --host 0.0.0.0",
                                           "segmentation-machine server --model-dir ~/my-model --fold 0 --device cpu"))
    serve.add_argument("--model-dir", type=Path, help="a model folder (else the official weights, downloaded once)")
    serve.add_argument("--fold", default="0", help="fold of --model-dir (default 0)")
    serve.add_argument("--model", help="official model id (default: upstream's default model)")
    serve.add_argument("--device", choices=["cuda", "cpu"], help="where the model runs (default: cuda when a GPU "
                                                                 "is present, else cpu)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 in the "
                                                           "pod image)")
    serve.add_argument("--port", type=int, default=1527, help="TCP port (default 1527)")
    serve.add_argument("--max-sessions", type=int, help="concurrent sessions (upstream default 3)")
    serve.add_argument("--no-torch-compile", action="store_true",
                       help="skip torch.compile on CUDA: on an H100 it starts about 46 s sooner and each prompt takes about "
                            "20 ms longer (always skipped on a CPU, where it gains nothing) "
                            "(automatic where no C compiler or Python headers are found, which compile needs)")
    serve.add_argument("--no-restart-on-out-of-memory", action="store_true",
                       help="after a prompt runs out of GPU memory, keep the server running (a large structure's "
                            "prompt then takes about twice as long) instead of restarting it (its clients reconnect "
                            "and send their scan again)")
    serve.set_defaults(run=run_server)


# What server_guard runs; the prompt client alone (the [ai] extra) installs nnInteractive.inference.remote only
SERVER_MODULES = ("nnInteractive.inference.server.main", "uvicorn")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its package is not there
        return False


def run_server(args):
    if not all(map(_installed, SERVER_MODULES)):
        raise UserError(f"The nnInteractive server is not installed: {install_extra('server')} (on a GPU machine, "
                        "install a CUDA build of torch first).")
    if args.model_dir:
        _check_model_dir(args.model_dir.expanduser(), args.fold)
    available = _default_device()  # imports torch: once
    device = args.device or available
    if device == "cuda" and available != "cuda":
        raise UserError("--device cuda, but torch sees no CUDA GPU here (none, or a driver too old for this torch's "
                        "CUDA): run on a GPU machine with a recent driver (and a CUDA build of torch), or use --device "
                        "cpu (slow).")
    if not args.model_dir:
        _official_weights_at_hand(args.model)
    key = os.environ.get("SM_NNI_API_KEY")
    if not key:
        key = secrets.token_urlsafe(32)
        print(f"API key (shown once; clients need it): {key}", flush=True)
    missing = _missing_for_compile() if device == "cuda" and not args.no_torch_compile else {}
    if missing:
        print(f"No {' and no '.join(missing)} found, which torch.compile needs: the server runs without it (prompts "
              f"about 20 ms slower); install {' and '.join(missing.values())} to have it.", flush=True)
        args.no_torch_compile = True
    command = [sys.executable, "-m", "SegmentationMachineLib.cli.server_guard", *upstream_arguments(args, device)]
    url = f"http://{args.host}:{args.port}"
    print(f"Starting the nnInteractive server on {url} ({device}); it loads the model first.", flush=True)
    stop_on_signals(("SIGTERM",))
    restarts = not args.no_restart_on_out_of_memory
    server = None
    try:
        with signals_held():
            server = _Upstream(command, key, restarts)
        while _answers_once_started(server.process, args.host, args.port):
            print(f"Ready: the nnInteractive server answers on {url}; Ctrl-C stops it.", flush=True)
            server.out_of_memory.clear()  # only a prompt's failure restarts it, never one while it started
            if not restarts or not server.runs_until_out_of_memory():
                server.process.wait()
                break
            print(RESTART_NOTE, flush=True)
            server.stop()
            with signals_held():
                server = _Upstream(command, key, restarts)
    except KeyboardInterrupt:
        pass
    finally:  # whatever ended us (a signal, our own output gone): never leave it holding the GPU and the port
        if server is not None:
            server.stop()
    if server is not None and not server.stopped_here and server.process.returncode not in (0, -signal.SIGTERM, None):
        raise UserError(f"The nnInteractive server stopped with status {server.process.returncode}: see its messages "
                        "above.")


def upstream_arguments(args, device: str) -> list:
    """`nninteractive-server`'s arguments for these options (never the key: `ps` shows it to every user)."""
    command = ["--host", args.host, "--port", str(args.port), "--device", device]
    if args.model_dir:
        command += ["--model-dir", str(args.model_dir), "--fold", str(args.fold)]
    elif args.model:
        command += ["--model", args.model]
    if args.max_sessions:
        command += ["--max-sessions", str(args.max_sessions)]
    if args.no_torch_compile or device == "cpu":  # on a CPU compile gains nothing (upstream says so, at length)
        command.append("--no-torch-compile")
    if device == "cpu":
        command += ["--torch-n-threads", str(os.cpu_count() or 1)]
    return command


class _Upstream:
    """One run of the upstream server, its log passed on as it comes."""

    def __init__(self, command: list, key: str, restarts: bool):
        # The key goes by environment. Unbuffered: through a pipe its request lines would otherwise come in
        # 8 KiB batches, and be lost with it.
        # UTF-8 both ways: a Windows pipe's cp1252 cannot carry a download's progress bar (█)
        self.process = subprocess.Popen(command, env={**os.environ, "NN_INTERACTIVE_API_KEY": key,
                                                      "PYTHONUNBUFFERED": "1", **UTF8_CHILD},
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.out_of_memory, self.stopped_here = threading.Event(), False
        # newline="": a download's progress bar keeps its carriage returns and redraws in place
        output = io.TextIOWrapper(self.process.stdout, encoding="utf-8", errors="replace", newline="")
        self.relay = threading.Thread(target=_relay, args=(output, self.out_of_memory, restarts), daemon=True)
        self.relay.start()

    def runs_until_out_of_memory(self) -> bool:
        """Waits until the server says it ran out of GPU memory (True) or exits (False)."""
        while self.process.poll() is None:
            if self.out_of_memory.wait(EXIT_POLL_S):
                return True
        return False

    def stop(self):
        """Ends it, if it still runs, and waits for its last lines."""
        if self.process.poll() is None:
            self.stopped_here = True  # its status then says nothing (on Windows, terminate() makes it 1)
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:  # it ignores TERM while a prediction runs
                self.process.kill()
                self.process.wait()
        self.relay.join(5)


def _relay(output, out_of_memory: threading.Event, restarts: bool):
    """Passes the server's log on, and notices a CUDA out of memory, which upstream only logs: the server answers
    again, but a large structure's prompt (several network passes) takes about twice as long until it restarts, a
    small one's does not (benchmarks/gpu_out_of_memory.py, on an H100). Starlette has sent the prompt's HTTP 500 by
    the time the traceback is logged."""
    try:
        for line in output:
            print(line, end="", flush=True)
            if _out_of_memory(line, out_of_memory) and not restarts:
                print(OUT_OF_MEMORY_NOTE, flush=True)
    except (OSError, ValueError):  # our own output is gone: go on reading, or the server blocks on its next line
        for line in output:
            _out_of_memory(line, out_of_memory)


def _out_of_memory(line: str, seen: threading.Event) -> bool:
    found = "OutOfMemoryError: CUDA out of memory" in line  # torch.cuda.OutOfMemoryError before torch 2.5
    if found:
        seen.set()
    return found


def _hub_unreachable() -> str:
    """Why Hugging Face (or HF_ENDPOINT) takes no connection, or '' (also behind a proxy, which only a request can
    judge)."""
    if os.environ.get("HF_HUB_OFFLINE") or any(os.environ.get(name) for name in (
            "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return ""
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
        socket.create_connection((endpoint.hostname, port), timeout=5).close()
        return ""
    except socket.gaierror:
        return f"its name {endpoint.hostname} was not found (DNS)"
    except OSError as error:
        return f"{endpoint.hostname} did not answer ({error.strerror or error})"


def _official_weights_at_hand(model: str = None):
    """Upstream asks Hugging Face for its model list at every start (unless a model it has is named, as the pod image
    names its baked one), retrying for half a minute, noisily, when it cannot: offline, the weights already
    downloaded are used at once, and none is one sentence."""
    root = Path(os.environ.get("NNINTERACTIVE_MODEL_DIR") or Path.home() / ".nninteractive").expanduser()
    if model and _downloaded(root, model):
        return
    unreachable = _hub_unreachable()
    if not unreachable:
        return
    if not _downloaded(root, model or _default_model(root)):
        raise UserError(f"The official nnInteractive weights are not on this machine and Hugging Face cannot be reached "
                        f"({unreachable}): connect this machine to the internet once (the weights are then kept in "
                        f"{printable(root)}), or give a model folder with --model-dir.")
    print(f"Hugging Face cannot be reached ({unreachable}): the server uses the weights already in {printable(root)}.",
          flush=True)
    os.environ["HF_HUB_OFFLINE"] = "1"  # for the server: upstream then takes its own cached list at once


def _downloaded(root: Path, model: str) -> bool:
    """Whether upstream's model root holds that official model (upstream's own test: a folder with something in it)."""
    folder = root / "models" / (model or "")
    return bool(model) and folder.is_dir() and any(folder.iterdir())


def _default_model(root: Path) -> str:
    """The default model of upstream's cached list (models.json), or '' without one."""
    try:
        models = json.loads((root / "models.json").read_text())["models"]
        return next((m["id"] for m in models if m.get("default")), models[0]["id"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return ""


def _check_model_dir(folder: Path, fold: str):
    """The mistakes upstream answers with a traceback: a folder that is not there, or not a model's."""
    if not folder.is_dir():
        raise UserError(f"--model-dir {printable(folder)} is not a folder: give the folder of a trained nnInteractive "
                        "model (the one holding fold_0/), or leave --model-dir out for the official weights.")
    if not (folder / f"fold_{fold}").is_dir():
        found = ", ".join(sorted(p.name for p in folder.glob("fold_*") if p.is_dir())) or "no fold_* folder"
        raise UserError(f"{printable(folder)} has no fold_{fold} folder (found: {found}): choose the fold with --fold, "
                        "or give the model's own folder.")
    if not any((folder / name).is_file() for name in ("inference_info.json", "inference_session_class.json")):
        raise UserError(f"{printable(folder)} is not an nnInteractive model folder (it has neither inference_info.json "
                        "nor inference_session_class.json): give the folder the model was trained or unpacked into.")


def _answers_once_started(process, host: str, port: int) -> bool:
    """Waits until the server answers its health check (True) or exits (False)."""
    local = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the server is here, never via a proxy
    while process.poll() is None:
        try:
            with opener.open(f"http://{local}:{port}/healthz", timeout=2) as answer:
                if answer.status == 200:
                    return True
        except (OSError, ValueError):  # not listening yet
            pass
        time.sleep(STARTUP_POLL_S)
    return False


def _missing_for_compile() -> dict:
    """What torch.compile lacks here (what it is: the Debian package that gives it): its Triton builds a launcher
    with the C compiler in CC (else cc, gcc or clang) against Python's headers, and upstream's default compile
    makes a server without them exit during its start-up warm-up."""
    missing = {}
    if not any(shutil.which(name) for name in (os.environ.get("CC"), "cc", "gcc", "clang") if name):
        missing["C compiler"] = "gcc"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        missing["Python headers"] = "python3-dev"
    return missing


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"
