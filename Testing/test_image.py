"""The pod image's files, checked without Docker: the supervisord configuration and the other
files the entrypoint renders from the environment (render_config.py run for real into a temporary
root), the server command against the installed upstream server's own argument parser, the pod agent's
count of desktop sessions on real sockets, the linters (hadolint, shellcheck), and a scan for default
passwords and open services. The upload page has its own tests (test_uploader.py)."""

import configparser
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
RENDER = DOCKER / "render_config.py"
SERVER_PROGRAMS = {"server", "agent"}
DESKTOP_PROGRAMS = SERVER_PROGRAMS | {"vnc", "novnc", "uploader", "slicer"}
SERVER_COMMAND = ("/opt/venv/bin/segmentation-machine server --host 0.0.0.0 --port 8000 --device cuda "
                  "--model nnInteractive_v1.0 --no-torch-compile")
SECRETS = ("SM_NNI_API_KEY", "SM_VNC_PASSWORD", "SM_FILES_PASSWORD", "SM_HEARTBEAT_TOKEN")


def render(root: Path, **env):
    """Runs the renderer as the entrypoint does, with only the given variables set."""
    return subprocess.run([sys.executable, str(RENDER), "--root", str(root)], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], **env})


def rendered(root: Path, **env) -> configparser.ConfigParser:
    result = render(root, **env)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    conf = configparser.ConfigParser(interpolation=None)
    conf.read(root / "etc/segmentation-machine/supervisord.conf")
    return conf


def programs(conf) -> dict:
    return {name.split(":", 1)[1]: conf[name] for name in conf.sections() if name.startswith("program:")}


def environment(section) -> dict:
    """supervisor's own reading of environment= (non-POSIX shlex, quotes stripped)."""
    lexer = shlex.shlex(section.get("environment", ""))
    lexer.wordchars += "/.+-():"
    tokens = list(lexer)
    return {tokens[i]: tokens[i + 2].strip("'\"") for i in range(0, len(tokens), 4)}


def credentials(root: Path) -> dict:
    lines = (root / "workspace/.segmentation-machine/credentials").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- supervisord ------------------------------------------------------------------------------

def test_server_mode_runs_the_server_and_the_agent_only(tmp_path):
    found = programs(rendered(tmp_path))
    assert set(found) == SERVER_PROGRAMS
    assert found["server"]["command"] == SERVER_COMMAND
    assert found["agent"]["command"] == "/opt/venv/bin/python -m SegmentationMachineLib.cloud.podagent"


def test_desktop_mode_adds_the_desktop_services(tmp_path):
    found = programs(rendered(tmp_path, SM_MODE="desktop"))
    assert set(found) == DESKTOP_PROGRAMS
    vnc = found["vnc"]["command"].split()
    assert vnc[0] == "/opt/segmentation-machine/docker/desktop/sm-vnc"
    assert "-localhost" in vnc and vnc[vnc.index("-securitytypes") + 1] == "VNC"
    assert vnc[vnc.index("-maxauthfails") + 1] == "0"  # behind websockify a stranger's failures blocked everyone
    assert vnc[vnc.index("-rfbauth") + 1] == "/home/sm/.vnc/passwd"
    assert found["novnc"]["command"].endswith("--web /opt/novnc --file-only 0.0.0.0:6080 127.0.0.1:5901")
    uploader = found["uploader"]["command"].split()
    assert uploader[:2] == ["/usr/bin/python3", "/opt/segmentation-machine/docker/uploader.py"]
    assert uploader[uploader.index("--inbox") + 1] == "/workspace/inbox" and uploader[uploader.index("--port") + 1] == "8080"
    assert uploader[uploader.index("--staging") + 1] == "/workspace/.uploads"  # outside the inbox, same volume
    assert uploader[uploader.index("--exports") + 1] == "/workspace/exports"  # where the desktop's exports go
    assert environment(found["slicer"])["SM_INBOX"] == "/workspace/inbox"
    assert environment(found["slicer"])["SM_INBOX_STATE"] == "/workspace/.inbox-state"  # its journal: on the volume
    assert all(found[name]["user"] == "sm" for name in ("vnc", "novnc", "uploader", "slicer"))


@pytest.mark.parametrize("mode", ["server", "desktop"])
def test_every_program_restarts_logs_and_runs_unprivileged(tmp_path, mode):
    for name, program in programs(rendered(tmp_path, SM_MODE=mode)).items():
        assert program["autorestart"] == "true" and program["autostart"] == "true", name
        if name in ("agent", "server"):  # why the pod ended, and why a prompt failed, belong in the pod log
            assert program["stdout_logfile"] == "/dev/stdout" and program["stdout_logfile_maxbytes"] == "0"
        else:
            assert program["stdout_logfile"] == f"/var/log/segmentation-machine/{name}.log", name
            assert program["stdout_logfile_maxbytes"] == "10MB", name
        assert program["redirect_stderr"] == "true", name
        assert program["user"] != "root", name


def test_control_socket_is_a_root_only_unix_socket(tmp_path):
    conf = rendered(tmp_path, SM_MODE="desktop")
    assert conf["unix_http_server"]["file"].startswith("/run/")
    assert conf["unix_http_server"]["chmod"] == "0700"
    assert conf["supervisorctl"]["serverurl"] == f"unix://{conf['unix_http_server']['file']}"
    assert not [s for s in conf.sections() if s.startswith("inet_http_server")]
    assert mode_of(tmp_path / "etc/segmentation-machine/supervisord.conf") == 0o600  # it holds secrets


def test_wiping_at_the_end_adds_the_wiper_as_the_desktop_user_and_tells_the_agent(tmp_path):
    """The agent (smagent) may not delete the desktop user's uploads: a wiper running as that user does it when asked
    (cloud/wipe.py), and holds no secret. A server pod keeps no uploads: no wiper, and the agent is not told."""
    from SegmentationMachineLib.cloud import wipe

    found = programs(rendered(tmp_path / "desktop", SM_MODE="desktop", SM_WIPE_AT_END="1", RUNPOD_API_KEY="rpa_SECRET"))
    assert set(found) == DESKTOP_PROGRAMS | {"wiper"}
    assert found["wiper"]["command"] == "/opt/venv/bin/python -m SegmentationMachineLib.cloud.wipe"
    assert found["wiper"]["user"] == "sm" and environment(found["wiper"])["SM_WORKSPACE"] == "/workspace"
    assert not {"RUNPOD_API_KEY", "SM_HEARTBEAT_TOKEN", "SM_NNI_API_KEY"} & set(environment(found["wiper"]))
    assert environment(found["agent"])["SM_WIPE_AT_END"] == "1"
    entrypoint = (DOCKER / "entrypoint.sh").read_text()  # each side's folder: only it may write there
    assert f"install -d -m 0755 -o smagent -g smagent {Path(wipe.REQUEST).parent}\n" in entrypoint
    assert f"install -d -m 0755 -o sm -g sm {Path(wipe.ANSWER).parent}\n" in entrypoint
    for env in ({"SM_MODE": "server", "SM_WIPE_AT_END": "1"}, {"SM_MODE": "desktop", "SM_WIPE_AT_END": "yes"},
                {"SM_MODE": "desktop"}):
        found = programs(rendered(tmp_path / str(len(env)) / env.get("SM_WIPE_AT_END", "-"), **env))
        assert "wiper" not in found and "SM_WIPE_AT_END" not in environment(found["agent"]), env
    assert "SM_WIPE_AT_END must be 0 or 1" in render(tmp_path / "said", SM_MODE="desktop", SM_WIPE_AT_END="yes").stderr


def test_each_program_gets_only_its_own_secrets(tmp_path):
    found = programs(rendered(tmp_path, SM_MODE="desktop", RUNPOD_API_KEY="rpa_SECRET", RUNPOD_POD_ID="pod1"))
    env = {name: environment(program) for name, program in found.items()}
    assert [name for name, e in env.items() if "RUNPOD_API_KEY" in e] == ["agent"]
    assert [name for name, e in env.items() if "SM_HEARTBEAT_TOKEN" in e] == ["agent", "uploader"]  # uploads are use
    assert [name for name, e in env.items() if "SM_NNI_API_KEY" in e] == ["server", "slicer"]
    assert [name for name, e in env.items() if "SM_FILES_PASSWORD" in e] == ["uploader"]
    assert not [name for name, e in env.items() if "SM_VNC_PASSWORD" in e]


# --- rendering the environment ----------------------------------------------------------------

def test_given_values_reach_the_programs(tmp_path):
    given = {"SM_NNI_API_KEY": "nni-key-0123456789", "SM_HEARTBEAT_TOKEN": "heartbeat-0123456789",
             "SM_IDLE_TIMEOUT_S": "300", "SM_MAX_LIFETIME_S": "7200", "SM_BUDGET_USD": "4.5",
             "SM_PRICE_PER_HOUR": "2.69", "SM_AGENT_PORT": "9001", "RUNPOD_POD_ID": "pod1", "RUNPOD_API_KEY": "rpa_KEY",
             "RUNPOD_REST_URL": "http://127.0.0.1:9999/v2?x=1"}
    found = programs(rendered(tmp_path, **given))
    server, agent = environment(found["server"]), environment(found["agent"])
    assert server["SM_NNI_API_KEY"] == "nni-key-0123456789"
    assert server["NNINTERACTIVE_MODEL_DIR"] == "/workspace/nninteractive"  # not baked here: the volume's cache
    assert server["HF_HOME"].startswith("/workspace/")
    assert {k: agent[k] for k in given if k != "SM_NNI_API_KEY"} == {k: v for k, v in given.items() if k != "SM_NNI_API_KEY"}
    assert "nni-key-0123456789" not in found["server"]["command"]  # never on a command line


def test_agent_defaults(tmp_path):
    agent = environment(programs(rendered(tmp_path))["agent"])
    assert agent["SM_IDLE_TIMEOUT_S"] == "900" and agent["SM_AGENT_PORT"] == "8001" and agent["SM_MODE"] == "server"
    assert agent["SM_MAX_LIFETIME_S"] == "43200"  # a pod started from a RunPod template ends after 12 h too
    assert "SM_BUDGET_USD" not in agent


def test_baked_weights_are_served_from_the_image_and_pinned(tmp_path):
    (tmp_path / "opt/nninteractive/models/nnInteractive_v1.0/fold_0").mkdir(parents=True)
    server = programs(rendered(tmp_path))["server"]
    assert environment(server)["NNINTERACTIVE_MODEL_DIR"] == "/opt/nninteractive"
    assert "--model nnInteractive_v1.0" in server["command"]  # no manifest lookup, no new default model
    assert "--model nnInteractive_v2.0" in programs(rendered(tmp_path, SM_NNI_MODEL="nnInteractive_v2.0"))[
        "server"]["command"]  # another model: not in the image, so downloaded into the volume's cache
    assert environment(programs(rendered(tmp_path, SM_NNI_MODEL="nnInteractive_v2.0"))["server"])[
        "NNINTERACTIVE_MODEL_DIR"] == "/workspace/nninteractive"


def test_the_server_command_is_ours_and_what_it_runs_is_what_the_installed_upstream_server_accepts(tmp_path):
    """Parsed by our CLI's parser, and the upstream command it runs by nnInteractive's own (the one
    `nninteractive-server` runs)."""
    from nnInteractive.inference.server.main import _build_parser
    from SegmentationMachineLib.cli.main import build_parser
    from SegmentationMachineLib.cli.server import upstream_arguments

    command = programs(rendered(tmp_path))["server"]["command"].split()
    assert command[0] == "/opt/venv/bin/segmentation-machine"
    ours = build_parser().parse_args(command[1:])
    assert not ours.no_restart_on_out_of_memory  # a CUDA out of memory restarts it
    upstream = _build_parser().parse_args(upstream_arguments(ours, ours.device))
    assert upstream.no_torch_compile and upstream.device == "cuda" and upstream.model == "nnInteractive_v1.0"
    assert upstream.host == "0.0.0.0" and upstream.port == 8000 and upstream.api_key is None  # the key by environment


def test_absent_secrets_are_generated_stored_privately_and_printed_once(tmp_path):
    first = render(tmp_path)
    assert first.returncode == 0, first.stderr
    stored = credentials(tmp_path)
    assert set(stored) == set(SECRETS)
    for name, value in stored.items():
        assert len(value) >= 32 and f"{name}={value}" in first.stdout
    assert mode_of(tmp_path / "workspace/.segmentation-machine/credentials") == 0o600
    assert mode_of(tmp_path / "workspace/.segmentation-machine") == 0o700

    second = render(tmp_path)  # a restart reuses them and prints nothing
    assert second.returncode == 0 and second.stdout == ""
    assert credentials(tmp_path) == stored
    assert environment(programs(rendered(tmp_path))["server"])["SM_NNI_API_KEY"] == stored["SM_NNI_API_KEY"]

    other = tmp_path / "other-pod"
    assert render(other).returncode == 0
    assert not set(credentials(other).values()) & set(stored.values())


def test_given_secrets_are_used_and_not_printed(tmp_path):
    result = render(tmp_path, SM_VNC_PASSWORD="vnc-password-123", SM_FILES_PASSWORD="files-password-123")
    assert "vnc-password-123" not in result.stdout and "files-password-123" not in result.stdout
    assert "SM_NNI_API_KEY=" in result.stdout and "SM_VNC_PASSWORD" not in result.stdout
    assert credentials(tmp_path)["SM_FILES_PASSWORD"] == "files-password-123"


@pytest.mark.parametrize("variable, value", [
    ("SM_VNC_PASSWORD", "short"),
    ("SM_FILES_PASSWORD", 'quote"in-the-value'),
    ("SM_NNI_API_KEY", "spaces are not allowed here"),
    ("SM_HEARTBEAT_TOKEN", "token-0123456789 ;comment"),
])
def test_an_unusable_secret_is_replaced_by_a_generated_one_never_a_failed_start(tmp_path, variable, value):
    result = render(tmp_path, **{variable: value})
    assert result.returncode == 0, result.stderr  # RunPod restarts a failed entrypoint forever, billing
    assert f"{variable} must be 12 to 256 characters" in result.stderr and value not in result.stderr
    generated = credentials(tmp_path)[variable]
    assert generated != value and f"{variable}={generated}" in result.stdout  # printed once, as generated ones are


# What RunPod's template form lets anyone type: supervisord ends a value at " ;" or " #" and expands "%(...)s".
HOSTILE = ["5 ;x", "900 #", "1e3", "-5", "0", "%(ENV_HOME)s", '"', "９００", "15m", "9\n00", "inf"]


@pytest.mark.parametrize("variable, default", [("SM_IDLE_TIMEOUT_S", "900"), ("SM_MAX_LIFETIME_S", "43200"),
                                               ("SM_BUDGET_USD", None), ("SM_WARNING_S", None),
                                               ("SM_AGENT_POLL_S", None), ("SM_AGENT_PORT", "8001")])
@pytest.mark.parametrize("value", HOSTILE)
def test_limits_take_plain_numbers_only_and_fall_back_to_their_default(tmp_path, variable, default, value):
    result = render(tmp_path, **{variable: value})
    assert result.returncode == 0 and f"{variable} must be" in result.stderr, result.stderr
    agent = environment(programs(rendered(tmp_path, **{variable: value}))["agent"])
    assert agent.get(variable) == default
    assert agent["SM_HEARTBEAT_TOKEN"] == credentials(tmp_path)["SM_HEARTBEAT_TOKEN"]  # the line still parses


@pytest.mark.parametrize("variable, value, fallback", [
    ("SM_MODE", "kiosk", "server"),
    ("SM_NNI_MODEL", "../../etc ;x", "nnInteractive_v1.0"),
    ("RUNPOD_API_BASE_URL", "http://x/%s", None),
    ("RUNPOD_POD_ID", "pod 1 ;x", None),
    ("CUDA_VISIBLE_DEVICES", "0 #x", None),
])
def test_other_unusable_settings_are_named_and_replaced(tmp_path, variable, value, fallback):
    result = render(tmp_path, **{variable: value})
    assert result.returncode == 0 and variable in result.stderr and "Traceback" not in result.stderr
    found = programs(rendered(tmp_path, **{variable: value}))
    if variable == "SM_MODE":
        assert set(found) == SERVER_PROGRAMS
    elif variable == "SM_NNI_MODEL":
        assert f"--model {fallback} " in found["server"]["command"]
    else:
        assert all(variable not in environment(program) for program in found.values())


def test_given_limits_are_passed_as_given(tmp_path):
    agent = environment(programs(rendered(tmp_path, SM_IDLE_TIMEOUT_S="300.5", SM_MAX_LIFETIME_S="3600",
                                          SM_BUDGET_USD="2.75", SM_AGENT_PORT="9001"))["agent"])
    assert (agent["SM_IDLE_TIMEOUT_S"], agent["SM_MAX_LIFETIME_S"], agent["SM_BUDGET_USD"], agent["SM_AGENT_PORT"]) == (
        "300.5", "3600", "2.75", "9001")


def test_ssh_only_with_public_key_and_keys_only(tmp_path):
    conf_file = tmp_path / "etc/segmentation-machine/sshd_config"
    assert "sshd" not in programs(rendered(tmp_path)) and not conf_file.exists()

    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample user@laptop"
    found = programs(rendered(tmp_path, PUBLIC_KEY=key))
    assert found["sshd"]["command"] == "/usr/sbin/sshd -D -e -f /etc/segmentation-machine/sshd_config"
    settings = dict(line.split(None, 1) for line in conf_file.read_text().splitlines()
                    if line.strip() and not line.startswith("#"))
    assert settings["PasswordAuthentication"] == "no" and settings["KbdInteractiveAuthentication"] == "no"
    assert settings["PermitRootLogin"] == "prohibit-password" and settings["PermitEmptyPasswords"] == "no"
    keys = tmp_path / "root/.ssh/authorized_keys"
    assert keys.read_text() == key + "\n" and mode_of(keys) == 0o600

    assert "sshd" not in programs(rendered(tmp_path))  # restarted without a key: no sshd
    assert not conf_file.exists()


ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample user@laptop"
RSA = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7exampleKeyBlob== work laptop"
SK = "sk-ssh-ed25519@openssh.com AAAAGnNrLXNzaC1lZDI1NTE5QG9wZW5zc2guY29tAAAAI key on a token"


def test_public_key_as_runpod_sends_it_keeps_the_keys_and_skips_the_rest(tmp_path):
    """RunPod's PUBLIC_KEY: the account's keys as free text joined by blank lines; not every line is a key."""
    text = f"{ED25519}\r\n\r\nMy laptop (added 2026-03):\n\n  {RSA}  \n\n---\n{SK}\nssh-ed25519\nssh-rsa not-base64!\n"
    result = render(tmp_path, PUBLIC_KEY=text)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "root/.ssh/authorized_keys").read_text().splitlines() == [ED25519, RSA, SK]
    skipped = [line for line in result.stderr.splitlines() if "is not an OpenSSH public key" in line]
    assert [line.split("line ")[1].split()[0] for line in skipped] == ["3", "7", "9", "10"]
    assert "My laptop" not in result.stderr  # free text is named by its line number only
    assert "sshd" in programs(rendered(tmp_path, PUBLIC_KEY=text))


@pytest.mark.parametrize("text", ["not a key", "ssh-ed25519 AAAA", "\n\nhello\n\n", "ssh-ed25519 AAAAC3Nza;rm -rf /"])
def test_public_key_without_a_key_leaves_ssh_off_and_the_start_going(tmp_path, text):
    result = render(tmp_path, PUBLIC_KEY=text)
    assert result.returncode == 0 and "SSH stays off" in result.stderr, result.stderr
    assert "sshd" not in programs(rendered(tmp_path, PUBLIC_KEY=text))
    assert not (tmp_path / "etc/segmentation-machine/sshd_config").exists()


def test_the_image_gives_slicer_the_module_folder_and_the_desktop_users_settings():
    # Slicer 5.10 reads Modules/AdditionalPaths only from its revision settings, which official builds keep under
    # Slicer's own folder (qSlicerApplicationHelper.cxx: revisionUserSettings()): a key in ~/.config was never read.
    launch = (DOCKER / "desktop/sm-slicer").read_text()
    assert re.search(r"/opt/slicer/Slicer --no-splash --additional-module-path "
                     r"/opt/segmentation-machine/SegmentationMachine \\\n", launch), launch
    assert "COPY SegmentationMachine /opt/segmentation-machine/SegmentationMachine\n" in (DOCKER / "Dockerfile").read_text()
    assert (REPO / "SegmentationMachine/SegmentationMachine.py").is_file()
    ini = configparser.ConfigParser()
    ini.optionxform = str  # QSettings' keys are case-sensitive
    ini.read(DOCKER / "desktop/Slicer.ini")
    assert "Modules" not in ini  # it would only mislead
    # Slicer saves scenes to DefaultScenePath (a key outside any group: QSettings' [General]), else to ~/Documents,
    # which is on the container disk that RunPod wipes at every stop; the Export icon looks under /workspace.
    assert ini["General"]["DefaultScenePath"] == "/workspace/scenes"
    assert "find /workspace " in (DOCKER / "desktop/sm-export-latest").read_text()
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"install -m 0644 -o sm -g sm /opt/segmentation-machine/docker/desktop/Slicer\.ini \\\n\s+"
                     r"/home/sm/\.config/slicer\.org/Slicer\.ini", text)
    assert "install -d -o sm -g sm /home/sm/Desktop /home/sm/.config /home/sm/.config/slicer.org" in text


def test_the_entrypoint_does_nothing_as_root_under_the_desktop_users_home():
    """The desktop user controls /home/sm: a planted link once made root chown /etc. Every command there runs
    as that user (as_sm), and nothing changes ownership or modes by itself."""
    lines = [line.strip() for line in (DOCKER / "entrypoint.sh").read_text().splitlines()
             if not line.strip().startswith("#")]
    touching = [line for line in lines if "DESKTOP_HOME" in line and not line.startswith(("DESKTOP_HOME=", "as_sm()"))]
    assert len(touching) >= 4
    for line in touching:
        for command in (c.strip() for c in re.split(r"\|\||&&|\||;|\bthen\b|\bif !?", line) if "DESKTOP_HOME" in c):
            assert command.startswith(("as_sm ", "[ -e ", "echo ")), line
    assert not [line for line in lines if re.search(r"\bchown\b|\bchmod\b", line)]


def test_the_entrypoint_never_refuses_to_start():
    """RunPod restarts a container whose entrypoint exits: a refusal would bill forever."""
    text = (DOCKER / "entrypoint.sh").read_text()
    assert not re.search(r"^\s*exit [1-9]", text, re.M) and "render_config.py" in text
    assert "return 2" not in RENDER.read_text() and "raise " not in RENDER.read_text()


# --- the files the image is built from --------------------------------------------------------

def test_slicers_python_gets_packages_only_beside_its_own_never_instead():
    """Each pip install into Slicer's Python adds our wheel alone (--no-deps), installs with every package Slicer
    ships pinned (-c, as the module does), or goes into a folder of its own (DICOM SEG's): Slicer 5.10's pydicom
    2.4, requests and cryptography stay (../shared/notes/slicer-5.10-runtime.md)."""
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    installs = [part for part in text.split("&&") if "PythonSlicer -m pip install" in part]
    assert len(installs) == 2
    for install in installs:
        arguments = shlex.split(install.split("pip install", 1)[1])
        assert "--no-deps" in arguments or "-c" in arguments, install
        assert not any(re.match(r"(pydicom|runpod|requests|urllib3|cryptography|numpy|scipy)\b", a) for a in arguments)
    assert "install_seg_packages(" in text  # pydicom 3 and highdicom: --target their own folder, --no-deps


def test_dockerfile_copies_what_exists_and_exposes_the_ports():
    text = (DOCKER / "Dockerfile").read_text()
    for sources in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for source in sources.split():
            assert (REPO / source).exists(), source
    assert re.search(r"^EXPOSE 8000 8001 6080 8080 22$", text, re.M)
    assert 'ENTRYPOINT ["/opt/segmentation-machine/docker/entrypoint.sh"]' in text
    assert "HEALTHCHECK" in text and "download.pytorch.org/whl/cu128" in text
    assert os.access(DOCKER / "entrypoint.sh", os.X_OK) and os.access(DOCKER / "healthcheck.sh", os.X_OK)
    assert (DOCKER / "Dockerfile.dockerignore").exists()


def test_what_a_desktop_user_makes_is_on_the_volume_and_the_agent_knows_what_is_not_theirs():
    """The folders the entrypoint makes on /workspace: the user's (theirs to fill), the image's (which the pod agent
    does not count as the user's files when it decides between stopping and terminating), and the agent's own."""
    from SegmentationMachineLib.cloud.podagent import AGENT_FOLDER, IMAGE_ENTRIES, WORKSPACE

    text = (DOCKER / "entrypoint.sh").read_text()
    lines = text.splitlines()
    kept = re.search(r"^KEPT=/workspace/(\S+)", text, re.M).group(1)  # root's: credentials, SSH host keys
    made = {folder: line.split()[line.split().index("-o") + 1] for line in lines if line.strip().startswith("install -d")
            for folder in line.split() if folder.startswith("/workspace/")}
    assert {made[f"/workspace/{name}"] for name in ("inbox", "exports", "scenes", ".uploads", ".inbox-state")} == {"sm"}
    assert made[f"{WORKSPACE}/{AGENT_FOLDER}"] == "smagent" and made["/workspace/nninteractive"] == "nni"
    assert {name.removeprefix("/workspace/") for name in made} - {"inbox", "exports", "scenes"} | {kept} == \
        IMAGE_ENTRIES - {"lost+found"}
    notices = (DOCKER / "desktop/sm-pod-notices").read_text()
    assert f"SM_POD_NOTICE:-{WORKSPACE}/{AGENT_FOLDER}/notice" in notices
    assert "\n/opt/segmentation-machine/docker/desktop/sm-pod-notices &\n" in (DOCKER / "desktop/xstartup").read_text()


def test_a_resumed_desktop_delivers_no_series_twice(tmp_path, monkeypatch):
    """A stop or restart wipes the container disk (the home folder): the inbox's journal lives on the volume, where
    the image's SM_INBOX_STATE puts it, so the series already in /workspace/inbox are not loaded again."""
    import time

    from SegmentationMachineLib.dicom.phantom import make_phantom, write_ct_series
    from SegmentationMachineLib.panels.inbox import InboxPanel

    volume = tmp_path / "workspace"
    monkeypatch.setenv("SM_INBOX_STATE", str(volume / ".inbox-state"))
    write_ct_series(volume / "inbox" / "upload", make_phantom(shape=(3, 16, 16)).hu, 1.5,
                    [(-12.0, -12.0, z) for z in (0.0, 2.0, 4.0)], "uploaded before the stop")

    def session(home) -> list:
        monkeypatch.setenv("HOME", str(home))  # a fresh container disk
        panel = InboxPanel(folder=volume / "inbox", settle_seconds=0.2, hold_seconds=0.2)
        panel.start()
        delivered, deadline = [], time.monotonic() + 4
        while time.monotonic() < deadline and not (delivered and panel.task and panel.task.done()):
            for delivery in panel.tick():
                delivered.append(delivery)
                panel.loaded(delivery, True)  # as the widget acknowledges a loaded series
            time.sleep(0.05)
        panel.stop()
        return delivered

    assert len(session(tmp_path / "home-before")) == 1
    assert session(tmp_path / "home-after-resume") == []


def run_desktop_entrypoint(tmp_path, ssh=False) -> subprocess.CompletedProcess:
    """docker/entrypoint.sh in desktop mode, for real, its paths moved under tmp_path: the desktop user is whoever
    runs the test, the renderer writes a desktop supervisord.conf (and an sshd_config with ssh), and supervisord is
    `true`. The container's own disk is tmp_path/root."""
    app, conf = tmp_path / "app", tmp_path / "conf"
    (app / "docker").mkdir(parents=True, exist_ok=True)
    (app / "docker/render_config.py").write_text(
        f"from pathlib import Path\nPath({str(conf)!r}).mkdir(exist_ok=True)\n"
        f"Path({str(conf)!r}, 'supervisord.conf').write_text('[program:vnc]\\n')\n"
        + (f"Path({str(conf)!r}, 'sshd_config').write_text('')\n" if ssh else ""))
    (tmp_path / "credentials").write_text("SM_VNC_PASSWORD=secret\n")
    (tmp_path / "root/etc/ssh").mkdir(parents=True, exist_ok=True)  # the image's, without host keys
    script = re.sub(r"-o (\w+) -g \1 ", "", (DOCKER / "entrypoint.sh").read_text())
    for image_path, moved in (("APP=/opt/segmentation-machine", f"APP={app}"), ("CONF=/etc/segmentation-machine", f"CONF={conf}"),
                              ("CREDENTIALS=$KEPT/credentials", f"CREDENTIALS={tmp_path}/credentials"),
                              ("ssh-keygen -A", f"ssh-keygen -A -f {tmp_path}/root"),
                              ("/etc/ssh/", f"{tmp_path}/root/etc/ssh/"), ("/run/sshd", f"{tmp_path}/root/run/sshd"),
                              ("DESKTOP_HOME=/home/sm", f"DESKTOP_HOME={tmp_path}/home"), ("runuser -u sm -- ", ""),
                              ("/opt/TurboVNC/bin/vncpasswd -f", "cat"), ("/workspace", f"{tmp_path}/workspace"),
                              ("/run/segmentation-machine /var/log/segmentation-machine", f"{tmp_path}/run"),
                              ("/run/segmentation-machine/agent", f"{tmp_path}/run/agent"),
                              ("/run/segmentation-machine/wiper", f"{tmp_path}/run/wiper"),
                              ("/usr/bin/supervisord", "true")):
        assert image_path in script, image_path
        script = script.replace(image_path, moved)
    (tmp_path / "entrypoint.sh").write_text(script)
    (tmp_path / "home" / ".config").mkdir(parents=True, exist_ok=True)  # as the image has it
    return subprocess.run(["bash", str(tmp_path / "entrypoint.sh")], capture_output=True, text=True, timeout=30)


def test_a_stopped_desktop_keeps_its_orcaslicer_profiles_and_dicom_database(tmp_path):
    """A stop wipes the container disk, the desktop user's home with it: a lab's printer set up in OrcaSlicer
    (~/.config/OrcaSlicer) and Slicer's DICOM database (~/Documents/SlicerDICOMDatabase) were gone at every resume.
    They live on the volume, and they alone do not make the agent keep a pod billing for its volume."""
    from SegmentationMachineLib.cloud.podagent import holds_user_files

    home, volume = tmp_path / "home", tmp_path / "workspace"
    printer = Path(".config/OrcaSlicer/user/default/machine/Lab printer 0.4 nozzle.json")
    database = Path("Documents/SlicerDICOMDatabase/ctkDICOM.sql")
    started = run_desktop_entrypoint(tmp_path)
    assert started.returncode == 0 and "preparing the pod failed" not in started.stderr, started.stderr
    for written in (printer, database):
        (home / written).parent.mkdir(parents=True, exist_ok=True)
        (home / written).write_text("the user's")
    assert (home / "SegmentationMachine/Exports").resolve() == volume / "exports"
    shutil.rmtree(home)  # the stop
    started = run_desktop_entrypoint(tmp_path)
    assert started.returncode == 0 and "preparing the pod failed" not in started.stderr, started.stderr
    assert (home / printer).read_text() == (home / database).read_text() == "the user's"
    assert (volume / ".desktop/OrcaSlicer" / printer.relative_to(".config/OrcaSlicer")).is_file()
    assert not holds_user_files(volume)  # settings only: an idle pod is still terminated, not kept billing
    copied = volume / ".desktop/SlicerDICOMDatabase/dicom/1.2.3/1.2.3.4.dcm"  # a series the database keeps a copy of
    copied.parent.mkdir(parents=True)
    copied.write_text("an unpacked zip's slice")
    assert holds_user_files(volume)
    copied.unlink()
    assert run_desktop_entrypoint(tmp_path, ssh=True).returncode == 0
    assert not holds_user_files(volume)  # nor do the pod's own SSH host keys and credentials
    (volume / "exports" / "Bone_20261127-010000").mkdir()
    (volume / "exports" / "Bone_20261127-010000" / "report.json").write_text("{}")
    assert holds_user_files(volume)


def test_a_resumed_pod_shows_ssh_the_same_host_keys(tmp_path):
    """ssh-keygen made new host keys at every start, and a stop wipes the container disk: after each resume ssh
    warned that the host's identification had changed, as it does for an attack."""
    started = run_desktop_entrypoint(tmp_path, ssh=True)
    assert started.returncode == 0 and "preparing the pod failed" not in started.stderr, started.stderr
    keys = {path.name: path.read_bytes() for path in (tmp_path / "root/etc/ssh").glob("ssh_host_*")}
    assert "ssh_host_ed25519_key" in keys and mode_of(tmp_path / "root/etc/ssh/ssh_host_ed25519_key") == 0o600
    assert mode_of(tmp_path / "workspace/.segmentation-machine/ssh") == 0o700
    shutil.rmtree(tmp_path / "root")  # the stop
    assert run_desktop_entrypoint(tmp_path, ssh=True).returncode == 0
    assert {path.name: path.read_bytes() for path in (tmp_path / "root/etc/ssh").glob("ssh_host_*")} == keys


def test_the_vnc_session_clears_a_crashed_xvnc_s_lock_before_it_starts_again(tmp_path):
    """TurboVNC's vncserver refuses a display whose lock or socket remains: after Xvnc was killed (out of memory),
    supervisord's restarts all failed and the desktop stayed black until the pod was recreated."""
    (tmp_path / ".X11-unix").mkdir()
    (tmp_path / ".X1-lock").write_text("  4242\n")
    (tmp_path / ".X11-unix/X1").write_text("")
    script = (DOCKER / "desktop/sm-vnc").read_text()
    assert "/tmp/" in script and "/opt/TurboVNC/bin/vncserver :1 " in script
    script = script.replace("/tmp/", f"{tmp_path}/").replace("/opt/TurboVNC/bin/vncserver", "echo")
    ran = subprocess.run(["bash", "-c", script, "sm-vnc", "-fg", "-localhost"], capture_output=True, text=True)
    assert ran.returncode == 0 and ran.stdout == ":1 -fg -localhost\n", ran.stderr
    assert not (tmp_path / ".X1-lock").exists() and not (tmp_path / ".X11-unix/X1").exists()


def test_desktop_icons_run_scripts_that_exist():
    icons = sorted((DOCKER / "desktop").glob("*.desktop"))
    assert {p.stem for p in icons} == {"slicer", "export", "send-to-printer"}
    for icon in icons:
        exec_line = re.search(r"^Exec=(.+)$", icon.read_text(), re.M).group(1)
        script = re.search(r"/opt/segmentation-machine/(docker/desktop/\S+)", exec_line).group(1)
        assert os.access(REPO / script, os.X_OK), icon.name


def test_novnc_page_reconnects_by_itself_and_carries_no_password():
    page = (DOCKER / "desktop/novnc-index.html").read_text()
    urls = re.findall(r"vnc\.html\?[^\"]*", page)
    assert len(urls) == 2
    assert all("autoconnect=true" in url and "reconnect=true" in url and "password" not in url for url in urls)


def test_the_image_has_no_file_browser_and_no_compiler():
    text = (DOCKER / "Dockerfile").read_text()
    assert "filebrowser" not in text.lower() and "filebrowser" not in RENDER.read_text().lower()
    assert not re.search(r"\b(build-essential|gcc|python3-dev)\b", text)  # the server runs --no-torch-compile
    assert "iproute2" in text  # ss: the agent counts desktop sessions
    assert re.search(r"^ARG BAKE_WEIGHTS=1$", text, re.M) and re.search(r"^ENV SM_NNI_MODEL=\$\{NNI_MODEL\}$", text, re.M)
    assert 'nninteractive-download-model "$NNI_MODEL" --model-dir /opt/nninteractive' in text


# --- linters: a missing linter fails, it never skips --------------------------------------------

def linter(name: str) -> str:
    path = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    assert path, f"{name} is missing: pip install -e '.[test]' installs it"
    return path


def shell_scripts() -> list:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.sh"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    scripts = {REPO / name for name in listed}
    for path in DOCKER.rglob("*"):
        if path.is_file() and re.match(rb"#!.*\b(ba)?sh\b", path.read_bytes()[:40]):
            scripts.add(path)
    return sorted(scripts)


def test_hadolint_passes():
    result = subprocess.run([linter("hadolint"), str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_passes_on_every_shell_script():
    scripts = shell_scripts()
    assert DOCKER / "entrypoint.sh" in scripts and DOCKER / "desktop/xstartup" in scripts
    assert REPO / "scripts/test.sh" in scripts
    result = subprocess.run([linter("shellcheck"), *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- no default passwords, no open services ----------------------------------------------------

INSECURE = {
    "File Browser without login": r"--noauth|auth\.method[= ]+noauth",
    "VNC without password": r"securitytypes[= ]+none|-nopw\b|\bvncpass\b",
    "password in the noVNC URL": r"vnc(_lite)?\.html\?[^\"'\s]*password=",
    "fixed password": r"passw(or)?d\s*[=:]\s*['\"]?(?![\"'$({\s])[^\s,;]+|\badmin[/:]admin\b|\bchpasswd\b",
    "runpod as a password": r"(passw(or)?d|pass|pw)\W{1,3}runpod\b",
    "SSH with passwords": r"PasswordAuthentication\s+yes|PermitEmptyPasswords\s+yes|PermitRootLogin\s+yes",
    "supervisord on the network": r"inet_http_server",
    "Jupyter": r"jupyter|NotebookApp|ServerApp\.token",
}


def insecure_findings(text: str) -> list:
    return [f"{problem}: {line.strip()}" for line in text.splitlines()
            for problem, pattern in INSECURE.items() if re.search(pattern, line, re.I)]


def test_image_files_have_no_fixed_password_or_open_service():
    # README.md is documentation (it may name what we never do); everything else goes into the image.
    files = [p for p in DOCKER.rglob("*") if p.is_file() and p.name != "README.md" and "__pycache__" not in p.parts]
    assert len(files) >= 10
    findings = [f"{p.relative_to(REPO)}: {finding}" for p in files for finding in insecure_findings(p.read_text())]
    assert findings == []


@pytest.mark.parametrize("bad", [
    "filebrowser -r /workspace --noauth",
    "filebrowser config set --auth.method=noauth",
    "Xvnc :1 -SecurityTypes None",
    "x11vnc -display :1 -nopw -forever",
    "printf 'vncpass\\nvncpass\\nn\\n' | vncpasswd",
    '<meta http-equiv="refresh" content="0;url=vnc.html?password=secret&autoconnect=true">',
    "File Browser login: admin/admin",
    "echo 'root:runpod' | chpasswd",
    "password=hunter2hunter2",
    'FB_PASSWORD: "runpod"',
    "PasswordAuthentication yes",
    "PermitEmptyPasswords yes",
    "PermitRootLogin yes",
    "[inet_http_server]",
    "jupyter lab --NotebookApp.token='' --ip=0.0.0.0",
])
def test_the_scan_finds_each_insecure_setting(bad):
    assert insecure_findings(bad)


@pytest.mark.parametrize("good", [
    'as_sm filebrowser -d "$db" users update sm --password "$(credential SM_FILES_PASSWORD)"',
    "PasswordAuthentication no",
    "PermitRootLogin prohibit-password",
    "vncserver :1 -fg -localhost -securitytypes VNC -rfbauth /home/sm/.vnc/passwd",
])
def test_the_scan_passes_what_the_image_does(good):
    assert insecure_findings(good) == []


def test_the_image_and_the_cloud_gpu_panel_agree_on_names_and_ports(tmp_path):
    """render_config.py is stdlib-only, so it keeps its own copies: they must match the library's."""
    from SegmentationMachineLib.cloud import cloudgpu
    from SegmentationMachineLib.cloud import podagent

    assert SECRETS == cloudgpu.SECRET_NAMES
    text = RENDER.read_text() + (DOCKER / "Dockerfile").read_text()
    for port in (cloudgpu.SERVER_PORT, cloudgpu.AGENT_PORT, cloudgpu.DESKTOP_PORT, cloudgpu.FILES_PORT):
        assert str(port) in (DOCKER / "Dockerfile").read_text().split("EXPOSE", 1)[1].splitlines()[0]
    assert f"0.0.0.0:{cloudgpu.DESKTOP_PORT} 127.0.0.1:{podagent.DESKTOP_PORTS}" in text  # websockify → Xvnc
    assert f"--port {cloudgpu.FILES_PORT}" in text and f"--port {cloudgpu.SERVER_PORT}" in text
    found = programs(rendered(tmp_path, SM_MODE="desktop"))
    assert f'SM_AGENT_PORT="{cloudgpu.AGENT_PORT}"' in found["agent"]["environment"]
    assert f'SM_IDLE_TIMEOUT_S="{cloudgpu.Limits.idle_timeout_s:g}"' in found["agent"]["environment"]


# --- desktop idleness: the pod agent counts authenticated VNC sessions, on real sockets ------------------

class Listener:
    """A local TCP server standing in for Xvnc: what it sends each client is what `ss` sees."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sockets = [self.server]

    def client(self, server_sends: int):
        client = socket.create_connection(("127.0.0.1", self.port))
        accepted, _ = self.server.accept()
        accepted.sendall(b"x" * server_sends)
        received = 0
        while received < server_sends:  # read by the client, so the bytes are acknowledged
            received += len(client.recv(1 << 20))
        self.sockets += [client, accepted]
        return client

    def close(self):
        for sock in self.sockets:
            sock.close()


def counted(ports, expected, timeout=5.0):
    """sessions_on(ports), waited for until it is `expected` (acknowledgements arrive asynchronously)."""
    from SegmentationMachineLib.cloud.podagent import sessions_on

    end = time.monotonic() + timeout
    while (found := sessions_on(ports)) != expected and time.monotonic() < end:
        time.sleep(0.05)
    return found


def test_only_sessions_that_got_past_the_vnc_login_count():
    from SegmentationMachineLib.cloud.podagent import AUTHENTICATED_BYTES, DESKTOP_PORTS

    assert DESKTOP_PORTS == "5901"  # Xvnc, where only websockify connects: not noVNC's 6080
    vnc, other = Listener(), Listener()
    try:
        vnc.client(0)  # a stranger's idle socket
        vnc.client(300)  # a login in progress or refused: version, security types, challenge, result
        other.client(10 * AUTHENTICATED_BYTES)  # busy, but on another port (an HTTP keep-alive on 6080)
        assert counted([vnc.port], 0) == 0
        viewer = vnc.client(200_000)  # a logged-in browser receives the desktop itself
        assert counted([vnc.port], 1) == 1
        assert counted([vnc.port, other.port], 2) == 2
        viewer.close()
        assert counted([vnc.port], 0) == 0
    finally:
        vnc.close()
        other.close()
