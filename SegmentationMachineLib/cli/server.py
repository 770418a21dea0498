"""`segmentation-machine server`: the upstream nnInteractive server, started with a key and stopped cleanly."""

import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from ..core.errors import UserError
from .common import stop_on_signals


def add_server_command(commands, common):
    serve = commands.add_parser("server", parents=[common],
                                help="run the upstream nnInteractive server (GPU workstation or pod)")
    serve.add_argument("--model-dir", type=Path, help="a model folder (else the official weights, downloaded once)")
    serve.add_argument("--fold", default="0", help="fold of --model-dir (default 0)")
    serve.add_argument("--model", help="official model id (default: upstream's default model)")
    serve.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when a GPU is present")
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1; 0.0.0.0 in the pod image")
    serve.add_argument("--port", type=int, default=1527)
    serve.add_argument("--max-sessions", type=int, help="concurrent sessions (upstream default 3)")
    serve.set_defaults(run=run_server)


def run_server(args):
    executable = shutil.which("nninteractive-server", path=os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if executable is None:
        raise UserError("The nnInteractive server is not installed: pip install 'segmentation-machine[server]' "
                        "(on a GPU machine, install a CUDA build of torch first).")
    key = os.environ.get("SM_NNI_API_KEY")
    if not key:
        key = secrets.token_urlsafe(32)
        print(f"API key (shown once; clients need it): {key}", flush=True)
    device = args.device or _default_device()
    command = [executable, "--host", args.host, "--port", str(args.port), "--device", device]
    if args.model_dir:
        command += ["--model-dir", str(args.model_dir), "--fold", str(args.fold)]
    elif args.model:
        command += ["--model", args.model]
    if args.max_sessions:
        command += ["--max-sessions", str(args.max_sessions)]
    if device == "cpu":
        command += ["--torch-n-threads", str(os.cpu_count() or 1)]
    print(f"nnInteractive server on http://{args.host}:{args.port} ({device}); Ctrl-C stops it.", flush=True)
    # The key goes by environment, never on the command line where `ps` shows it to every user.
    process = subprocess.Popen(command, env={**os.environ, "NN_INTERACTIVE_API_KEY": key}, stdin=subprocess.DEVNULL)
    stop_on_signals(("SIGTERM",))
    try:
        process.wait()
    except KeyboardInterrupt:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:  # it ignores TERM while a prediction runs
            process.kill()
    if process.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL, None):
        raise UserError(f"The nnInteractive server stopped with status {process.returncode}: see its messages above.")


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"
