"""`segmentation-machine pod ...`: RunPod GPU pods from the terminal, never a surprise bill.

`pod up` stays in the foreground while connected, sending heartbeats to the pod agent; Ctrl-C,
SIGTERM or a closed terminal terminates the pod (a desktop pod: stops it; one started with --wipe-at-end: has its
agent wipe the uploads and end it), unless --detach, after which the agent's idle timeout ends it once nobody connects.
"""

import getpass
import importlib
import signal
import sys
import time

from ..cloud.agentend import END_WAIT_S
from ..cloud.cloudgpu import (KEY_NAME, MAX_FALLBACK_PRICE, MODES, CloudGpu, Limits, StartedPod,
                               recorded_pod, runpod_key, within_reach)
from ..cloud.heartbeat import INTERVAL_S, Heartbeat
from ..cloud.pods import MIN_VRAM_GB, PodsError, RunPodRest, spend_per_hr
from ..cloud.podstart import DEFAULT_TIMEOUT_S
from ..core.credentials import SecretStore
from ..core.errors import UserError, install_extra
from .common import examples

SM = "segmentation-machine pod"
SIGNAL_POLL_S = 0.2  # how soon a Ctrl-C while connected is acted on, between heartbeats
ENDING_SIGNALS = [signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])]
CLOUD_HELP = "secure (default: RunPod's data centres) or community (cheaper third-party hosts: not for patient data)"


def add_pod_commands(commands, common):
    pod = commands.add_parser("pod", help="RunPod GPU pods: gpus, up, status, list, stop, resume, down, login, logout",
                              **examples(f"{SM} login", f"{SM} up --gpu 'RTX 4090' --max-price 0.8", f"{SM} down --all"))
    pod.set_defaults(run=run_pod)
    actions = pod.add_subparsers(dest="pod_command", required=True)
    gpus = actions.add_parser("gpus", parents=[common],
                              help=f"NVIDIA GPU types in stock with ≥ {MIN_VRAM_GB} GB, cheapest first",
                              **examples(f"{SM} gpus --cloud community"))
    gpus.add_argument("--cloud", choices=["secure", "community"], default="secure", help=CLOUD_HELP)

    up = actions.add_parser("up", parents=[common], help="start a pod and wait until its server answers",
                            **examples(f"{SM} up", f"{SM} up --mode desktop --budget 2 --detach"))
    up.add_argument("--gpu",
                    help=f"GPU type id or name (default: the cheapest with ≥ {MIN_VRAM_GB} GB that has capacity)")
    up.add_argument("--mode", choices=MODES, default="server", help="server (default) or desktop (Slicer in a browser)")
    source = up.add_mutually_exclusive_group()
    source.add_argument("--image", help="container image (default SM_POD_IMAGE, else ghcr.io/segmentation-machine/pod, "
                                        "which is not published yet: build and push the image first, docker/README.md)")
    source.add_argument("--template", help="RunPod template id instead of an image")
    up.add_argument("--cloud", choices=["secure", "community"], default="secure", help=CLOUD_HELP)
    up.add_argument("--max-price", type=float, help="only GPU types costing at most this many $/h")
    up.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds until a start that is not "
                    f"ready is terminated (default {DEFAULT_TIMEOUT_S:g})")
    up.add_argument("--idle-timeout", type=float, default=900, help="the pod ends after this many seconds in "
                    "which nothing used it: no connected client's prompt, no upload, no open desktop (default 900)")
    up.add_argument("--max-lifetime", type=float, default=Limits.max_lifetime_s,
                    help=f"the pod ends after this many seconds in any case (default {Limits.max_lifetime_s:g})")
    up.add_argument("--budget", type=float, help="the pod ends once it has cost this many dollars")
    up.add_argument("--wipe-at-end", action="store_true",
                    help="desktop: before the pod ends (idle timeout, lifetime, budget, Ctrl-C here, `pod stop`), its "
                         "agent deletes the uploaded DICOM on its volume (inbox, uploads, Slicer's DICOM database; "
                         "exports and scenes stay). RunPod's own stop at the maximum lifetime (a backstop for a pod "
                         "whose agent died) cannot wipe, nor can a stop where the agent does not answer (said then): "
                         "`pod down` deletes the whole volume")
    up.add_argument("--volume-gb", type=int, help="size of the pod's /workspace volume (default 50)")
    up.add_argument("--network-volume", help="id of a network volume to mount at /workspace instead")
    up.add_argument("--detach", action="store_true", help="return once ready and leave the pod running")
    resume = actions.add_parser("resume", parents=[common], help="resume a stopped pod started here and connect",
                                **examples(f"{SM} resume abc123xyz"))
    resume.add_argument("pod_id", help="the pod's id, as `pod status` or `pod list` shows it")
    resume.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds until a resume that is "
                        f"not ready is stopped again (default {DEFAULT_TIMEOUT_S:g})")
    resume.add_argument("--detach", action="store_true", help="return once ready and leave the pod running")

    status = actions.add_parser("status", parents=[common], help="pods started here (or one pod): state, cost, URLs",
                                **examples(f"{SM} status", f"{SM} status abc123xyz --show-secrets"))
    status.add_argument("pod_id", nargs="?", help="one pod's id (default: every pod started from this computer)")
    status.add_argument("--show-secrets", action="store_true", help="also print the pod's server key and passwords")
    actions.add_parser("list", parents=[common], help="every pod on the account, with its cost since its last start",
                       **examples(f"{SM} list"))
    stop = actions.add_parser("stop", parents=[common], help="stop a pod: no GPU billing, its volume is kept (one "
                              "started with --wipe-at-end: its agent wipes the uploads first)",
                              **examples(f"{SM} stop abc123xyz"))
    stop.add_argument("pod_id", help="the pod's id, as `pod status` or `pod list` shows it")
    down = actions.add_parser("down", parents=[common], help="terminate a pod (its volume is deleted)",
                              **examples(f"{SM} down abc123xyz", f"{SM} down --all"))
    target = down.add_mutually_exclusive_group(required=True)
    target.add_argument("pod_id", nargs="?", help="the pod's id, as `pod status` or `pod list` shows it")
    target.add_argument("--all", action="store_true", help="every pod started from this computer")
    actions.add_parser("login", parents=[common], help="save the RunPod API key (read without echo) in the keychain",
                       **examples(f"{SM} login", f"pass show runpod | {SM} login"))
    actions.add_parser("logout", parents=[common], help="forget the saved RunPod API key", **examples(f"{SM} logout"))


def run_pod(args):
    try:
        importlib.import_module("requests")  # the cloud extra: Slicer bundles it, a bare pip install does not
    except ImportError:
        raise UserError(f"The pod commands need the cloud extra: {install_extra('cloud')}.") from None
    if args.pod_command in ("login", "logout"):
        return _login() if args.pod_command == "login" else _logout()
    cloud = CloudGpu(RunPodRest(runpod_key()))
    {"gpus": _gpus, "up": _up, "resume": _resume, "status": _status, "list": _list, "stop": _stop,
     "down": _down}[args.pod_command](cloud, args)


def _login():
    store = SecretStore()
    key = (getpass.getpass("RunPod API key: ") if sys.stdin.isatty() else sys.stdin.readline()).strip()
    if not key:
        raise UserError("No key was entered: copy it from the RunPod console → Settings → API Keys.")
    RunPodRest(key).pods()  # a wrong key is said now, not at the first start
    print(f"Saved in {store.save(KEY_NAME, key)}.")


def _logout():
    store = SecretStore()
    if store.load(KEY_NAME) is None:
        print("No RunPod API key is stored here: nothing to forget.")
        return
    store.forget(KEY_NAME)
    print("The RunPod API key is no longer stored here.")


def _gpus(cloud: CloudGpu, args):
    choices = cloud.gpu_choices(cloud=args.cloud.upper())  # asked first: RunPod unreachable is one sentence alone
    print(f"{'GPU type':32} {'VRAM':>6} {'$/h ' + args.cloud:>14}")
    for gpu in choices:
        print(f"{gpu.id:32} {gpu.memory_gb:>4} GB {gpu.price(args.cloud.upper()):>14.2f}")
    print(_spending(cloud.backend.pods()))


def _spending(pods) -> str:
    return (f"Spending ${spend_per_hr(pods):.2f}/h now; the balance is in the RunPod console "
            "(RunPod's API does not tell it).")


def _up(cloud: CloudGpu, args):
    Limits(wipe_at_end=args.wipe_at_end).check_mode(args.mode)  # before RunPod is asked anything
    _terminate_on_signals()
    for pod, cost in cloud.started_earlier():
        if pod.status == "EXITED":
            print(f"Stopped since an earlier start: {pod.id} ({pod.gpu}); {pod.stopped_cost()}: `{SM} resume {pod.id}` "
                  f"continues it, `{SM} down {pod.id}` terminates it.")
        else:
            spent = f", ${cost:.2f} since its last start" if pod.runtime_ready else ""  # no uptime: cost unknown
            print(f"Still there from an earlier start: {pod.id} ({pod.gpu}, {pod.status}{spent}); `{SM} down {pod.id}` "
                  "terminates it.")
    choices = cloud.gpu_choices(args.gpu, args.cloud.upper(), args.max_price)
    price = choices[0].price(args.cloud.upper())
    limit = price * MAX_FALLBACK_PRICE if args.max_price is None else args.max_price  # the user's limit, when given
    choices = within_reach(choices[0], choices, args.cloud.upper(), limit)
    limits = Limits(args.idle_timeout, args.max_lifetime, args.budget, args.wipe_at_end)
    volume = {k: v for k, v in (("volume_gb", args.volume_gb), ("network_volume_id", args.network_volume)) if v}
    then = f"; without capacity there, the next types up to ${limit:.2f}/h" if choices[1:] else ""
    print(f"Starting a {args.mode} pod on {choices[0].id} (${price:.2f}/h){then}.", flush=True)
    _connect(cloud, args, lambda display: cloud.up(choices, args.mode, args.image, args.template, args.cloud.upper(),
                                                   limits, args.timeout, display, volume=volume),
             "the pod being started was terminated")


def _resume(cloud: CloudGpu, args):
    _terminate_on_signals()
    print(f"Resuming pod {args.pod_id}.", flush=True)
    _connect(cloud, args, lambda display: cloud.resume(args.pod_id, args.timeout, display),
             "the pod was stopped again, its volume kept")


def _connect(cloud: CloudGpu, args, start, interrupted: str):
    """Runs start(progress display) and then, unless --detach, stays connected until interrupted."""
    display = _PhaseDisplay(args.quiet)
    try:
        started = start(display)
    except KeyboardInterrupt:
        print(f"\nInterrupted: {interrupted}.", flush=True)
        raise SystemExit(130) from None
    finally:
        display.close()
    ended = _ended_by_signals()  # from here a signal never interrupts: it ends the connection (not a detached one)
    _describe(started)
    if args.detach:
        print(f"Detached: {_detached_end(started)}")
        return
    _stay_connected(cloud, started, ended)


def _stay_connected(cloud: CloudGpu, started: StartedPod, ended: list):
    """Heartbeats and RunPod's word on the pod every INTERVAL_S, until the pod ends or a signal lands in ended."""
    heartbeat = Heartbeat(started.agent_url, started.secrets["SM_HEARTBEAT_TOKEN"])
    ending = ("stops the pod (its volume, with your files, stays and bills per month until `pod down`)"
              if started.mode == "desktop" else "terminates the pod")
    if cloud.wipes_at_end(started.pod_id):
        ending = ("has its agent wipe the uploads and end the pod (your exports and scenes stay on its volume, which "
                  "bills per month until `pod down`)")
    print(f"Connected: this terminal keeps the pod alive; Ctrl-C or closing it {ending}.", flush=True)
    warned, last = "", None  # last: the pod as RunPod last described it
    while not ended:
        heartbeat.beat()
        if heartbeat.warning and heartbeat.warning != warned:
            warned = heartbeat.warning
            print(f"Warning from the pod: {warned}", flush=True)
        try:
            last = cloud.backend.get(started.pod_id)
        except PodsError as error:  # RunPod hiccups: the heartbeats go on, RunPod is asked again later
            print(f"RunPod did not answer ({error}); still connected.", flush=True)
        else:
            if last is None:
                cloud.records.remove(started.pod_id)
                print(f"Pod {started.pod_id} was terminated ({warned or 'from elsewhere'}).")
                return
            if last.status == "EXITED":  # e.g. by its agent, whose pod-scoped key may only stop it
                print(f"Pod {started.pod_id} was stopped ({warned or 'from elsewhere'}); {last.stopped_cost()}: "
                      f"`{SM} resume {started.pod_id}` continues it, `{SM} down {started.pod_id}` terminates it.")
                return
        deadline = time.monotonic() + INTERVAL_S
        while not ended and time.monotonic() < deadline:
            time.sleep(SIGNAL_POLL_S)
    cost = _cost_of(last) if last else ""
    if started.mode == "desktop":  # the uploads, scenes and exports on its volume are the user's
        _say_ending(cloud, started.pod_id, last)
        stopped = cloud.stop_asked(started.pod_id, last)  # first: printing to a closed terminal may fail
        print(stopped.sentence(started.pod_id, cost, f"`{SM} resume {started.pod_id}` continues it, "
                       f"`{SM} down {started.pod_id}` terminates it with your files."), flush=True)
        return
    cloud.terminate(started.pod_id)
    print(f"Terminated pod {started.pod_id}{cost}.", flush=True)


def _detached_end(started: StartedPod) -> str:
    """How a detached pod ends: a desktop pod holding the user's files stops, and its volume bills on."""
    down = f"`{SM} down {started.pod_id}`"
    when = "once nothing has used it for its idle timeout, at its budget or at its maximum lifetime"
    if started.mode != "desktop":
        return f"the pod is terminated {when}, or with {down}."
    volume = started.pod.stopped_cost(f"until {down}") if started.pod else f"its volume bills per month until {down}"
    return f"the pod ends {when}, or with {down}; with your files on its volume it ends by stopping, and then {volume}."


def _describe(started: StartedPod):
    print(f"Ready: pod {started.pod_id}{started.billing}\n{_urls(started)}\n"
          f"  (`segmentation-machine model --server {started.server_url} ...` finds its key by itself)")
    if started.mode == "desktop":
        print(f"  Passwords: `segmentation-machine pod status {started.pod_id} --show-secrets`")


def _urls(started: StartedPod) -> str:
    lines = [f"  nnInteractive server: {started.server_url}"]
    if started.mode == "desktop":
        lines += [f"  Desktop:     {started.desktop_url}",
                  f"  Files:       {started.files_url} (uploads in, exports out)"]
    return "\n".join(lines)


def _pod_line(pod) -> str:
    if pod.status == "EXITED":  # RunPod reports a stopped pod with no rate (0.0) and no uptime
        return f"{pod.id} {pod.name}: EXITED, {pod.gpu}; stopped, {pod.stopped_cost()}"
    if not pod.runtime_ready:  # RunPod reports no uptime (yet): "$0.00 in 0 min" would be wrong
        return f"{pod.id} {pod.name}: {pod.status}, {pod.gpu}, ${pod.cost_per_hr:.2f}/h"
    return (f"{pod.id} {pod.name}: {pod.status}, {pod.gpu}, ${pod.cost_per_hr:.2f}/h, "
            f"${pod.cost_since_started:.2f} in the {pod.uptime_s / 60:.0f} min since its last start")


def _status(cloud: CloudGpu, args):
    ids = [args.pod_id] if args.pod_id else list(cloud.records.all())
    if not ids:
        print("No pods started from this computer are recorded; `segmentation-machine pod list` shows the account's.")
    for pod_id in ids:
        pod = cloud.backend.get(pod_id)
        if pod is None:
            cloud.records.remove(pod_id)
            print(f"{pod_id}: terminated.")
            continue
        print(_pod_line(pod))
        print(f"  {_billed(cloud, pod)}")
        started = recorded_pod(cloud.records, pod_id)
        if started is None:
            continue
        print(_urls(started))
        if args.show_secrets:
            for name, value in started.secrets.items():
                print(f"  {name}={value}")


def _billed(cloud: CloudGpu, pod) -> str:
    """RunPod's own figure for what the pod has cost over all its starts (the lines above count since the last)."""
    try:
        return f"Billed by RunPod since it was created: ${cloud.backend.billed(pod):.2f} (GPU and disk, all its starts)."
    except PodsError as error:
        return f"RunPod's billing for it could not be read ({error})"


def _list(cloud: CloudGpu, args):
    recorded = cloud.records.all()
    pods = cloud.backend.pods()
    for pod in pods:
        print(_pod_line(pod) + (" (started here)" if pod.id in recorded else ""))
    print(f"{len(pods)} pod(s). {_spending(pods)}")


def _stop(cloud: CloudGpu, args):
    pod = cloud.existing(args.pod_id)
    _say_ending(cloud, args.pod_id, pod)
    stopped = cloud.stop_asked(args.pod_id, pod)
    print(stopped.sentence(args.pod_id, _cost_of(pod), f"`segmentation-machine pod down {args.pod_id}` terminates "
                   f"it, `pod resume {args.pod_id}` continues."))


def _say_ending(cloud: CloudGpu, pod_id: str, pod):
    """Before a stop that waits for the pod's agent to wipe the uploads: minutes, at most."""
    if cloud.wipes_at_end(pod_id) and (pod is None or pod.status == "RUNNING"):
        try:
            print(f"Asking the agent of pod {pod_id} to wipe the uploads and end it (up to {END_WAIT_S / 60:.0f} "
                  "min)...", flush=True)
        except OSError:  # a closed terminal (Ctrl-C's sibling, SIGHUP): the stop comes first
            pass


def _down(cloud: CloudGpu, args):
    ids = list(cloud.records.all()) if args.all else [args.pod_id]
    for pod_id in ids:
        cost = _cost_of(cloud.existing(pod_id))
        cloud.terminate(pod_id)
        print(f"Terminated pod {pod_id}{cost}.")
    if not ids:
        print("No pods started from this computer are recorded; `segmentation-machine pod list` shows the account's.")


def _cost_of(pod) -> str:
    """What the pod's current run cost, where RunPod says (a running pod's rate and uptime): a stopped pod or one in
    ERROR is reported with no rate or uptime (a running pod may be too), and "$0.00" would be wrong."""
    return f" (this run cost ${pod.cost_since_started:.2f})" if pod.status == "RUNNING" and pod.runtime_ready else ""


class _PhaseDisplay:
    """One line rewritten in place on a terminal; a line per phase change otherwise (logs, pipes)."""

    def __init__(self, quiet: bool):
        self._live = sys.stderr.isatty() and not quiet
        self._phase = None

    def __call__(self, progress):
        if self._live:
            print(f"\r  {progress}"[:100].ljust(100), end="", file=sys.stderr, flush=True)
        elif progress.phase != self._phase:
            print(f"  {progress}", flush=True)
        self._phase = progress.phase

    def close(self):
        if self._live:
            print(file=sys.stderr)



def _terminate_on_signals():
    """While a pod starts: Ctrl-C, SIGTERM and a closed terminal (SIGHUP) interrupt once; later ones wait for the
    termination."""

    def interrupt(signum, frame):
        for each in ENDING_SIGNALS:
            signal.signal(each, signal.SIG_IGN)
        raise KeyboardInterrupt

    for each in ENDING_SIGNALS:
        signal.signal(each, interrupt)


def _ended_by_signals() -> list:
    """While connected: the first of those signals is appended to the list returned, later ones are ignored. No
    exception: one raised wherever the signal lands can leave a lock held (logging's, say), and the termination
    after it would then wait forever."""
    ended = []

    def note(signum, frame):
        for each in ENDING_SIGNALS:
            signal.signal(each, signal.SIG_IGN)
        ended.append(signum)

    for each in ENDING_SIGNALS:
        signal.signal(each, note)
    return ended
