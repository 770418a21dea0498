#!/usr/bin/env python3
"""Renders the pod's environment into service configuration files (stdlib only).

Called by entrypoint.sh on every start, before supervisord. `--root` prefixes every path
written, so tests render into a temporary folder; paths *inside* the files stay absolute.

- Secrets: taken from the environment, else from the credentials file of an earlier start,
  else generated. Only newly generated ones are printed, so each appears in the pod log once.
- supervisord.conf: the programs of the mode (server | desktop), each given only the
  variables it needs, because supervisord passes its own environment to every child.
- SSH: a key-only sshd config and authorized_keys, only when RunPod's PUBLIC_KEY holds a key.

Nothing here stops the start: a container whose entrypoint exits is restarted by RunPod forever,
billing. A value the pod cannot use is replaced by its safe default and named in the pod log.
"""

import argparse
import configparser
import hashlib
import io
import os
import re
import secrets
import sys
from pathlib import Path

SECRETS = ("SM_NNI_API_KEY", "SM_VNC_PASSWORD", "SM_FILES_PASSWORD", "SM_HEARTBEAT_TOKEN")
CREDENTIALS = "/workspace/.segmentation-machine/credentials"  # root's, on the volume: a resumed pod keeps them
CONF_DIR = "/etc/segmentation-machine"
SOCKET = "/run/segmentation-machine/supervisor.sock"
LOG_DIR = "/var/log/segmentation-machine"
VENV = "/opt/venv/bin"
APP = "/opt/segmentation-machine"
WORKSPACE = "/workspace"
DESKTOP_USER, DESKTOP_HOME = "sm", "/home/sm"
PATH = f"{VENV}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Every value written into supervisord.conf matches one of these strict patterns: supervisord's parser
# ends a value at " ;" or " #" and expands "%(...)s", so free text would break the whole file.
SECRET_PATTERN = re.compile(r"[A-Za-z0-9._+=-]{12,256}")  # letters, digits and -_.+=
NUMBER = re.compile(r"[0-9]{1,9}(\.[0-9]{1,6})?")  # seconds or dollars
MODEL_ID = re.compile(r"nnInteractive_[A-Za-z0-9._-]{1,64}")
URL = re.compile(r"https?://[A-Za-z0-9._~:/?&=+@,-]{1,2000}")
POD_VALUE = re.compile(r"[A-Za-z0-9._-]{1,256}")  # RunPod's pod id and key
GPU_IDS = re.compile(r"[A-Za-z0-9,:-]{1,256}")
MODES = ("server", "desktop")
# The agent's limits (SM_*, seconds or dollars) and their defaults; a pod started from a RunPod template
# gets a maximum lifetime too, so a forgotten one does not bill for days.
# SM_PRICE_PER_HOUR is set by the client at create: the budget holds even when the pod cannot read its price.
LIMITS = {"SM_IDLE_TIMEOUT_S": "900", "SM_MAX_LIFETIME_S": str(12 * 3600), "SM_BUDGET_USD": None,
          "SM_WARNING_S": None, "SM_AGENT_POLL_S": None, "SM_PRICE_PER_HOUR": None}
DEFAULT_MODEL = "nnInteractive_v1.0"
BAKED_MODELS = "/opt/nninteractive"  # nninteractive-download-model's model root at build time (BAKE_WEIGHTS=1)


def warn(message: str):
    """One line in the pod log; the start goes on."""
    print(f"segmentation-machine: {message}", file=sys.stderr, flush=True)


def strict(env, name: str, valid, default, what: str, instead: str = None):
    """env[name] when valid(it) (a pattern or a test), else the default, said in the pod log (never the value:
    it may be a secret)."""
    value = env.get(name, "")
    if not value:
        return default
    if (valid.fullmatch if isinstance(valid, re.Pattern) else valid)(value):
        return value
    warn(f"{name} must be {what}; it is ignored and {instead or default or 'none'} is used instead.")
    return default


def positive_number(text: str) -> bool:
    return bool(NUMBER.fullmatch(text)) and float(text) > 0


def unprivileged_port(text: str) -> bool:
    return bool(re.fullmatch(r"[0-9]{4,5}", text)) and 1024 <= int(text) <= 65535


def root_path(root: Path, absolute: str) -> Path:
    return root / absolute.lstrip("/")


def write_private(path: Path, text: str, mode: int = 0o600):
    """Writes a file that is never readable by others, not even for a moment."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    os.chmod(path, mode)  # an existing file keeps its old mode through O_CREAT


def read_credentials(path: Path) -> dict:
    if not path.exists():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key: value for key, value in pairs if key in SECRETS}


def resolve_secrets(env, root: Path):
    """(all secrets, the names generated now); stores them in the root-only credentials file."""
    stored = read_credentials(root_path(root, CREDENTIALS))
    values, generated = {}, []
    for name in SECRETS:
        value = strict(env, name, SECRET_PATTERN, None, "12 to 256 characters of letters, digits and -_.+=",
                       "the value of the last start, or a new one printed below,") or stored.get(name)
        if value is None or not SECRET_PATTERN.fullmatch(value):
            value = secrets.token_urlsafe(24)  # 192 bits
            generated.append(name)
        values[name] = value
    write_private(root_path(root, CREDENTIALS), "".join(f"{k}={v}\n" for k, v in values.items()))
    return values, generated


def supervisor_env(pairs: dict) -> str:
    """supervisor's KEY="value",... syntax (every value already checked against a strict pattern)."""
    return ",".join(f'{key}="{value}"' for key, value in pairs.items())


def agent_env(env) -> dict:
    """The agent's limits (numbers only) and RunPod's pod id, key and API addresses (tests: the fake)."""
    chosen = {name: strict(env, name, positive_number, default, "a number above 0 (seconds or dollars)",
                           default or "no limit") for name, default in LIMITS.items()}
    for name in sorted(env):
        if name in ("RUNPOD_POD_ID", "RUNPOD_API_KEY"):
            chosen[name] = strict(env, name, POD_VALUE, None, "letters, digits and ._-")
        elif name.startswith("RUNPOD_") and name.endswith("_URL"):
            chosen[name] = strict(env, name, URL, None, "an http(s) address", "RunPod's")
    return {name: value for name, value in chosen.items() if value is not None}


def gpu_env(env) -> dict:
    chosen = {name: strict(env, name, GPU_IDS, None, "GPU indexes or ids", "every GPU")
              for name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")}
    return {name: value for name, value in chosen.items() if value is not None}


def server_model(env, root: Path):
    """(model id, model root): the weights baked into the image when they are there, else the volume's cache
    (downloaded on the first start by upstream's model management)."""
    model = strict(env, "SM_NNI_MODEL", MODEL_ID, DEFAULT_MODEL, "an official model id (nnInteractive_...)")
    baked = root_path(root, f"{BAKED_MODELS}/models/{model}")
    return model, (BAKED_MODELS if baked.is_dir() else f"{WORKSPACE}/nninteractive")


def programs(env, mode: str, values: dict, root: Path, ssh: bool) -> dict:
    """Each program's command, user and environment; the desktop ones only in desktop mode."""
    gpu = gpu_env(env)
    agent_port = strict(env, "SM_AGENT_PORT", unprivileged_port, "8001", "a port number from 1024 to 65535")
    model, model_root = server_model(env, root)
    # A desktop pod's uploaded DICOM wiped before its agent ends it: the agent asks, the wiper (the desktop user's,
    # who owns the files) deletes (SegmentationMachineLib/cloud/wipe.py).
    wipe_at_end = mode == "desktop" and strict(env, "SM_WIPE_AT_END", re.compile("[01]"), "0", "0 or 1") == "1"
    result = {
        "server": {
            # The upstream server, run by our `server` command: it restarts it after a CUDA out of memory, which
            # leaves upstream's answering at half speed. --device cuda: on a host whose driver cannot run our torch
            # it refuses in one sentence in the pod log (repeated by supervisord's retries; the start times out and
            # is terminated) instead of quietly running on the CPU while the GPU bills. --no-torch-compile:
            # compiling needs a C compiler and Python headers (not in the image), adds ~46 s to every start and saves ~20 ms a prompt (docker/README.md). --model pins the weights, so
            # a start neither asks Hugging Face for its manifest nor picks up a new default model.
            "command": (f"{VENV}/segmentation-machine server --host 0.0.0.0 --port 8000 --device cuda "
                        f"--model {model} --no-torch-compile"),
            "user": "nni",
            "log": "/dev/stdout",  # the pod log in RunPod's console: where a failed prompt's traceback is looked for
            # The key by environment, never on the command line where `ps` shows it. The weights: baked into
            # the image, else downloaded once into the volume's cache (HF_HOME: Hugging Face's own files).
            "env": {"HOME": "/var/lib/nni", "SM_NNI_API_KEY": values["SM_NNI_API_KEY"],
                    "NNINTERACTIVE_MODEL_DIR": model_root, "HF_HOME": f"{WORKSPACE}/nninteractive/huggingface",
                    **gpu},
            "stopwaitsecs": "30",
        },
        "agent": {
            "command": f"{VENV}/python -m SegmentationMachineLib.cloud.podagent",
            "user": "smagent",
            "log": "/dev/stdout",  # the pod log in RunPod's console: why the pod ended is seen there
            # The server's key only hashed: heartbeats with it count too (the AI section of a client that knows
            # only the server's URL and key), and the agent never holds the key itself.
            "env": {"HOME": "/var/lib/smagent", "SM_MODE": mode, "SM_HEARTBEAT_TOKEN": values["SM_HEARTBEAT_TOKEN"],
                    "SM_NNI_KEY_SHA256": hashlib.sha256(values["SM_NNI_API_KEY"].encode()).hexdigest(),
                    "SM_AGENT_PORT": agent_port, **agent_env(env), **({"SM_WIPE_AT_END": "1"} if wipe_at_end else {})},
        },
    }
    if mode == "desktop":
        desktop = {"HOME": DESKTOP_HOME, "USER": DESKTOP_USER, "LOGNAME": DESKTOP_USER}
        result.update({
            # Xvnc listens on localhost only: the browser reaches it through websockify, and
            # VNC password authentication is the only security type offered. No blocking after failed logins:
            # through websockify every browser is 127.0.0.1, so five wrong passwords from a stranger locked the
            # owner out (for doubling times); a generated password cannot be guessed online.
            "vnc": {
                "command": (f"{APP}/docker/desktop/sm-vnc -fg -localhost -securitytypes VNC -maxauthfails 0 "
                            f"-rfbauth {DESKTOP_HOME}/.vnc/passwd -geometry 1920x1080 -depth 24 "
                            f"-xstartup {APP}/docker/desktop/xstartup"),
                "user": DESKTOP_USER, "env": desktop, "priority": "10",
            },
            "novnc": {
                "command": f"{VENV}/websockify --web /opt/novnc --file-only 0.0.0.0:6080 127.0.0.1:5901",
                "user": DESKTOP_USER, "env": desktop, "priority": "20",
            },
            # Our own files page (docker/uploader.py, standard library only): uploads into the inbox, finished
            # exports back out; the password by environment.
            "uploader": {
                "command": (f"/usr/bin/python3 {APP}/docker/uploader.py --host 0.0.0.0 --port 8080 "
                            f"--inbox {WORKSPACE}/inbox --staging {WORKSPACE}/.uploads --exports {WORKSPACE}/exports"),
                # The heartbeat token: an upload is use, told to the agent (a big study sent through this page
                # with no desktop open met the idle timeout); the token can keep the pod running, nothing more.
                "user": DESKTOP_USER, "env": {**desktop, "SM_FILES_PASSWORD": values["SM_FILES_PASSWORD"],
                                              "SM_HEARTBEAT_TOKEN": values["SM_HEARTBEAT_TOKEN"],
                                              "SM_AGENT_PORT": agent_port},
            },
            "slicer": {
                "command": f"{APP}/docker/desktop/sm-slicer",
                "user": DESKTOP_USER, "priority": "30",
                "env": {**desktop, "DISPLAY": ":1", "SM_INBOX": f"{WORKSPACE}/inbox",
                        "SM_INBOX_STATE": f"{WORKSPACE}/.inbox-state",  # on the volume, as the inbox is
                        "SM_NNI_URL": "http://127.0.0.1:8000", "SM_NNI_API_KEY": values["SM_NNI_API_KEY"], **gpu},
            },
        })
    if wipe_at_end:
        # What it could not delete, it tells the agent, which says it in the pod log.
        result["wiper"] = {"command": f"{VENV}/python -m SegmentationMachineLib.cloud.wipe", "user": DESKTOP_USER,
                           "env": {"HOME": DESKTOP_HOME, "SM_WORKSPACE": WORKSPACE}}
    if ssh:
        result["sshd"] = {"command": f"/usr/sbin/sshd -D -e -f {CONF_DIR}/sshd_config", "user": "root", "env": {}}
    return result


def supervisord_conf(env, mode: str, values: dict, root: Path, ssh: bool) -> str:
    conf = configparser.ConfigParser(interpolation=None)
    # A unix socket only root can open, and no TCP control port: nothing listens on the network.
    conf["unix_http_server"] = {"file": SOCKET, "chmod": "0700", "chown": "root:root"}
    conf["supervisord"] = {"nodaemon": "true", "user": "root", "logfile": "/dev/stdout",
                           "logfile_maxbytes": "0", "pidfile": "/run/segmentation-machine/supervisord.pid",
                           "childlogdir": LOG_DIR}
    conf["rpcinterface:supervisor"] = {
        "supervisor.rpcinterface_factory": "supervisor.rpcinterface:make_main_rpcinterface"}
    conf["supervisorctl"] = {"serverurl": f"unix://{SOCKET}"}
    for name, program in programs(env, mode, values, root, ssh).items():
        conf[f"program:{name}"] = {
            "command": program["command"],
            "user": program["user"],
            "environment": supervisor_env({"PATH": PATH, "LANG": "C.UTF-8", **program["env"]}),
            "priority": program.get("priority", "50"),
            "autostart": "true",
            "autorestart": "true",
            "startretries": "10",
            "stopasgroup": "true",
            "killasgroup": "true",
            "stopwaitsecs": program.get("stopwaitsecs", "10"),
            "redirect_stderr": "true",
            "stdout_logfile": program.get("log", f"{LOG_DIR}/{name}.log"),
            "stdout_logfile_maxbytes": "0" if "log" in program else "10MB",  # /dev/stdout cannot be rotated
            "stdout_logfile_backups": "0" if "log" in program else "3",
        }
    text = io.StringIO()
    conf.write(text)
    return f"; Written by render_config.py on every start (SM_MODE={mode}); edits are lost.\n" + text.getvalue()


SSHD_CONFIG = """\
# Written by render_config.py because PUBLIC_KEY is set: keys only, never passwords.
Port 22
HostKey /etc/ssh/ssh_host_ed25519_key
HostKey /etc/ssh/ssh_host_ecdsa_key
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitEmptyPasswords no
UsePAM no
X11Forwarding no
PrintMotd no
Subsystem sftp internal-sftp
"""
# One OpenSSH public key: its type, its base64 blob, an optional comment.
KEY_LINE = re.compile(r"(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp(256|384|521)|sk-(ssh-ed25519|ecdsa-sha2-nistp256)"
                      r"@openssh\.com) [A-Za-z0-9+/]{16,}={0,3}( [^\x00-\x1f]*)?")


def ssh_keys(env) -> list:
    """The key lines of RunPod's PUBLIC_KEY: the account's keys as free text joined by blank lines. Other
    lines are skipped with a log line naming only their number (they may be anything)."""
    keys = []
    for number, line in enumerate(env.get("PUBLIC_KEY", "").splitlines(), 1):
        line = " ".join(line.split())
        if KEY_LINE.fullmatch(line):
            keys.append(line)
        elif line:
            warn(f"PUBLIC_KEY line {number} is not an OpenSSH public key (ssh-ed25519 AAAA... comment); skipped.")
    if env.get("PUBLIC_KEY", "").strip() and not keys:
        warn("PUBLIC_KEY holds no OpenSSH public key: SSH stays off.")
    return keys


def render_ssh(keys: list, root: Path):
    config, authorized = root_path(root, f"{CONF_DIR}/sshd_config"), root_path(root, "/root/.ssh/authorized_keys")
    if not keys:
        config.unlink(missing_ok=True)  # a pod restarted without a key runs no sshd
        return
    write_private(config, SSHD_CONFIG, 0o644)
    write_private(authorized, "\n".join(keys) + "\n")


def render(env, root: Path, out=sys.stdout):
    mode = env.get("SM_MODE") or "server"
    if mode not in MODES:
        warn("SM_MODE must be server or desktop; the pod starts in server mode.")
        mode = "server"
    values, generated = resolve_secrets(env, root)
    keys = ssh_keys(env)
    write_private(root_path(root, f"{CONF_DIR}/supervisord.conf"), supervisord_conf(env, mode, values, root, bool(keys)))
    render_ssh(keys, root)
    if generated:
        print(f"segmentation-machine: generated credentials (printed this once; kept in {CREDENTIALS}):", file=out)
        for name in generated:
            print(f"  {name}={values[name]}", file=out)
    out.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/"), help="prefix of every path written (tests)")
    args = parser.parse_args(argv)
    render(os.environ, args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
