"""The pod image's files, checked without Docker: the supervisord configuration and the other
files the entrypoint renders from the environment (render_config.py run for real into a temporary
root), the linters (hadolint, shellcheck), and a scan for default passwords and open services."""

import configparser
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
RENDER = DOCKER / "render_config.py"
SERVER_PROGRAMS = {"server", "agent"}
DESKTOP_PROGRAMS = SERVER_PROGRAMS | {"vnc", "novnc", "filebrowser", "slicer"}
SECRETS = ("SM_NNI_API_KEY", "SM_VNC_PASSWORD", "SM_FILES_PASSWORD", "SM_HEARTBEAT_TOKEN")


def render(root: Path, **env):
    """Runs the renderer as the entrypoint does, with only the given variables set."""
    return subprocess.run([sys.executable, str(RENDER), "--root", str(root)], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], **env})


def rendered(root: Path, **env) -> configparser.ConfigParser:
    result = render(root, **env)
    assert result.returncode == 0, result.stderr
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
    lines = (root / "root/.segmentation-machine/credentials").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- supervisord ------------------------------------------------------------------------------

def test_server_mode_runs_the_server_and_the_agent_only(tmp_path):
    found = programs(rendered(tmp_path))
    assert set(found) == SERVER_PROGRAMS
    assert found["server"]["command"] == ("/opt/venv/bin/segmentation-machine server --host 0.0.0.0 --port 8000 "
                                          "--device cuda")
    assert found["agent"]["command"] == "/opt/venv/bin/python -m SegmentationMachineLib.cloud.podagent"


def test_desktop_mode_adds_the_desktop_services(tmp_path):
    found = programs(rendered(tmp_path, SM_MODE="desktop"))
    assert set(found) == DESKTOP_PROGRAMS
    vnc = found["vnc"]["command"].split()
    assert vnc[0] == "/opt/TurboVNC/bin/vncserver"
    assert "-localhost" in vnc and vnc[vnc.index("-securitytypes") + 1] == "VNC"
    assert vnc[vnc.index("-rfbauth") + 1] == "/home/sm/.vnc/passwd"
    assert found["novnc"]["command"].endswith("--web /opt/novnc 0.0.0.0:6080 127.0.0.1:5901")
    filebrowser = found["filebrowser"]["command"].split()
    assert filebrowser[filebrowser.index("-r") + 1] == "/workspace" and filebrowser[filebrowser.index("-p") + 1] == "8080"
    assert environment(found["slicer"])["SM_INBOX"] == "/workspace/inbox"
    assert all(found[name]["user"] == "sm" for name in ("vnc", "novnc", "filebrowser", "slicer"))


@pytest.mark.parametrize("mode", ["server", "desktop"])
def test_every_program_restarts_logs_and_runs_unprivileged(tmp_path, mode):
    for name, program in programs(rendered(tmp_path, SM_MODE=mode)).items():
        assert program["autorestart"] == "true" and program["autostart"] == "true", name
        if name == "agent":  # why the pod was terminated belongs in the pod log
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


def test_each_program_gets_only_its_own_secrets(tmp_path):
    found = programs(rendered(tmp_path, SM_MODE="desktop", RUNPOD_API_KEY="rpa_SECRET", RUNPOD_POD_ID="pod1"))
    env = {name: environment(program) for name, program in found.items()}
    assert [name for name, e in env.items() if "RUNPOD_API_KEY" in e] == ["agent"]
    assert [name for name, e in env.items() if "SM_HEARTBEAT_TOKEN" in e] == ["agent"]
    assert sorted(name for name, e in env.items() if "SM_NNI_API_KEY" in e) == ["server", "slicer"]
    assert not [name for name, e in env.items() if {"SM_VNC_PASSWORD", "SM_FILES_PASSWORD"} & set(e)]


# --- rendering the environment ----------------------------------------------------------------

def test_given_values_reach_the_programs(tmp_path):
    given = {"SM_NNI_API_KEY": "nni-key-0123456789", "SM_HEARTBEAT_TOKEN": "heartbeat-0123456789",
             "SM_IDLE_TIMEOUT_S": "300", "SM_MAX_LIFETIME_S": "7200", "SM_BUDGET_USD": "4.5",
             "SM_AGENT_PORT": "9001", "RUNPOD_POD_ID": "pod1", "RUNPOD_API_KEY": "rpa_KEY",
             "RUNPOD_API_BASE_URL": "http://127.0.0.1:9999/graphql?x=1"}
    found = programs(rendered(tmp_path, **given))
    server, agent = environment(found["server"]), environment(found["agent"])
    assert server["SM_NNI_API_KEY"] == "nni-key-0123456789"
    assert server["NNINTERACTIVE_MODEL_DIR"] == "/workspace/nninteractive"  # weights cached on the volume
    assert server["HF_HOME"].startswith("/workspace/")
    assert {k: agent[k] for k in given if k != "SM_NNI_API_KEY"} == {k: v for k, v in given.items() if k != "SM_NNI_API_KEY"}
    assert "nni-key-0123456789" not in found["server"]["command"]  # never on a command line


def test_agent_defaults(tmp_path):
    agent = environment(programs(rendered(tmp_path))["agent"])
    assert agent["SM_IDLE_TIMEOUT_S"] == "900" and agent["SM_AGENT_PORT"] == "8001" and agent["SM_MODE"] == "server"


def test_absent_secrets_are_generated_stored_privately_and_printed_once(tmp_path):
    first = render(tmp_path)
    assert first.returncode == 0, first.stderr
    stored = credentials(tmp_path)
    assert set(stored) == set(SECRETS)
    for name, value in stored.items():
        assert len(value) >= 32 and f"{name}={value}" in first.stdout
    assert mode_of(tmp_path / "root/.segmentation-machine/credentials") == 0o600
    assert mode_of(tmp_path / "root/.segmentation-machine") == 0o700

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
    ("SM_VNC_PASSWORD", "short"),  # File Browser and good sense want 12+ characters
    ("SM_FILES_PASSWORD", 'quote"in-the-value'),
    ("SM_NNI_API_KEY", "spaces are not allowed here"),
    ("SM_MODE", "kiosk"),
    ("RUNPOD_API_BASE_URL", "http://x/%s"),
])
def test_unusable_settings_stop_the_start_with_a_sentence(tmp_path, variable, value):
    result = render(tmp_path, **{variable: value})
    assert result.returncode == 2
    assert variable in result.stderr and "Traceback" not in result.stderr


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
    assert render(tmp_path, PUBLIC_KEY="not a key").returncode == 2


def test_desktop_registers_the_module_with_slicer(tmp_path):
    rendered(tmp_path, SM_MODE="desktop")
    ini = configparser.ConfigParser()
    ini.read(tmp_path / "home/sm/.config/slicer.org/Slicer.ini")
    assert ini["Modules"]["AdditionalPaths"] == "/opt/segmentation-machine/SegmentationMachine"


# --- the files the image is built from --------------------------------------------------------

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


def test_desktop_icons_run_scripts_that_exist():
    icons = sorted((DOCKER / "desktop").glob("*.desktop"))
    assert {p.stem for p in icons} == {"slicer", "export", "send-to-printer"}
    for icon in icons:
        exec_line = re.search(r"^Exec=(.+)$", icon.read_text(), re.M).group(1)
        script = re.search(r"/opt/segmentation-machine/(docker/desktop/\S+)", exec_line).group(1)
        assert os.access(REPO / script, os.X_OK), icon.name


def test_novnc_page_carries_no_password():
    page = (DOCKER / "desktop/novnc-index.html").read_text()
    urls = re.findall(r"vnc\.html\?[^\"]*", page)
    assert urls and all("autoconnect=true" in url and "password" not in url for url in urls)


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
    assert f"0.0.0.0:{cloudgpu.DESKTOP_PORT}" in text and podagent.DESKTOP_PORTS == str(cloudgpu.DESKTOP_PORT)
    assert f"-p {cloudgpu.FILES_PORT}" in text and f"--port {cloudgpu.SERVER_PORT}" in text
    found = programs(rendered(tmp_path, SM_MODE="desktop"))
    assert f'SM_AGENT_PORT="{cloudgpu.AGENT_PORT}"' in found["agent"]["environment"]
    assert f'SM_IDLE_TIMEOUT_S="{cloudgpu.Limits.idle_timeout_s:g}"' in found["agent"]["environment"]
