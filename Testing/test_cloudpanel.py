"""The module's Cloud GPU section without Qt: key, GPU list, start to ready, cancel, earlier pods, quit."""

import time

import pytest

from conftest import RUNPOD_KEY
from SegmentationMachineLib.cloud.cloudgpu import KEY_NAME
from SegmentationMachineLib.cloud.podstart import PodRecords
from SegmentationMachineLib.cloud.pods import KEPT_WHILE_CREDIT, RunPodRest
from SegmentationMachineLib.core.credentials import SecretStore
from SegmentationMachineLib.core.errors import UserError
from SegmentationMachineLib.panels.cloud import CloudPanel


@pytest.fixture
def panel(fake, tmp_path, monkeypatch):
    fake.boot_s, fake.ports_s, fake.server_s = 0.5, 0.7, 1.0
    monkeypatch.setenv("SM_RUNPOD_PROXY_URL", fake.proxy_template())
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    return CloudPanel(SecretStore(tmp_path / "secrets", use_keychain=False), PodRecords(tmp_path / "pods.json"))


def settle(panel, timeout=60):
    """Polls like the widget's QTimer until the work is done; returns what tick() handed back."""
    end = time.monotonic() + timeout
    handed = None
    while True:
        handed = panel.tick() or handed
        if not panel.busy:
            return handed
        assert time.monotonic() < end, panel.status
        time.sleep(0.05)


def ticked_until_ended(panel, timeout=30):
    """Ticks like the widget's QTimer until the panel has no pod (its heartbeat found the pod ended), then settles."""
    end = time.monotonic() + timeout
    while panel.pod is not None:
        assert time.monotonic() < end, panel.status
        panel.tick()
        time.sleep(0.05)
    settle(panel)


def keyed(panel):
    """The panel as after a saved key: GPU types and balance listed."""
    panel.store.save(KEY_NAME, RUNPOD_KEY)
    panel.refresh()
    settle(panel)


def test_a_wrong_key_is_said_and_not_kept_a_right_one_lists_gpus(panel):
    panel.save_key("rpa_not_the_key")
    settle(panel)
    assert "RunPod rejected the API key" in panel.status and not panel.has_key
    panel.save_key(f"  {RUNPOD_KEY}\n")
    settle(panel)
    assert panel.has_key and panel.store.load(KEY_NAME) == RUNPOD_KEY
    assert [g.id for g in panel.gpus] == ["NVIDIA RTX A5000", "NVIDIA GeForce RTX 4090", "NVIDIA L40S"]
    assert panel.balance == "Spending $0.00/h now (the balance is in the RunPod console)"
    assert panel.status.startswith("Choose a GPU")
    panel.forget_key()
    assert not panel.has_key and panel.gpus == [] and "removed" in panel.status


def test_start_reports_phases_connects_and_beats_then_quit_terminates(panel, fake):
    keyed(panel)
    fake.no_capacity = {"NVIDIA RTX A5000", "NVIDIA GeForce RTX 4090"}
    panel.start("NVIDIA RTX A5000", "desktop")  # $0.27/h: nothing else costs at most 1.5 times that
    settle(panel)
    assert panel.status.startswith("No capacity right now for NVIDIA RTX A5000:") and fake.pods == {}
    panel.start("NVIDIA GeForce RTX 4090", "desktop")  # no capacity: L40S ($0.86/h ≤ 1.5 × $0.69/h) takes over
    seen = set()
    while panel.busy:
        panel.tick()
        if panel.progress:
            seen.add(panel.progress.phase.value)
            assert 0 < panel.phase_fraction <= 1
        time.sleep(0.05)
    ready = panel.tick() or panel.pod
    assert ready is panel.pod and ready.mode == "desktop" and "is ready" in panel.status
    assert "pulling the image" in seen  # (waiting for a GPU lasts one request: too short to sample)
    assert fake.pods[ready.pod_id]["gpu"]["id"] == "NVIDIA L40S"
    deadline = time.monotonic() + 10
    while fake.pods[ready.pod_id].get("heartbeats", 0) < 2:  # during the start, and once connected
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert ready.desktop_url.endswith("/vnc.html?autoconnect=1&reconnect=true&resize=remote")
    # At quit a desktop pod is stopped: the user's uploads, scenes and exports on its volume stay.
    assert panel.desktops_started_here() == [ready.pod_id]
    assert panel.end_started_here() == [] and fake.pods[ready.pod_id]["status"] == "EXITED" and panel.pod is None
    assert panel.started_here == []


def test_at_quit_server_pods_are_terminated_and_desktop_pods_too_when_the_user_asks(panel, fake):
    keyed(panel)
    for mode in ("desktop", "server"):
        panel.start("NVIDIA L40S", mode)
        settle(panel)
    assert len(panel.started_here) == 2 and len(panel.desktops_started_here()) == 1
    assert panel.end_started_here(keep_desktop_files=False) == [] and fake.pods == {}


def test_one_job_at_a_time_and_terminate_needs_its_pod(panel, fake):
    keyed(panel)
    panel.start("NVIDIA L40S", "server")
    with pytest.raises(UserError, match="Wait until the Cloud GPU section has finished"):
        panel.refresh()  # would have replaced the start and lost its pod
    settle(panel)
    first, first_beat = panel.pod, panel.heartbeat
    panel.start("NVIDIA GeForce RTX 4090", "server")
    settle(panel)
    assert first_beat._stop.is_set() and panel.pod is not first  # one pod in use, one heartbeat
    panel.terminate(first.pod_id)  # from the list of pods still there: the pod in use stays
    settle(panel)
    assert panel.pod is not None and first.pod_id not in fake.pods and panel.pod.pod_id in fake.pods
    assert panel.started_here == [panel.pod.pod_id]
    stopped = panel.pod.pod_id
    panel.stop()  # kept on purpose: quitting must not terminate it
    settle(panel)
    assert panel.status.startswith(f"Stopped pod {stopped}: no GPU billing; its 50 GB volume costs "
                                   "$10.00/month until RunPod terminates the pod at ")
    assert panel.status.endswith(f"(its maximum lifetime), and is {KEPT_WHILE_CREDIT}. 1 pod(s) started earlier are "
                                 "still there: connect to or terminate them below.")
    assert panel.started_here == [] and panel.end_started_here() == []
    assert [p["status"] for p in fake.pods.values()] == ["EXITED"]


def test_at_quit_the_pods_are_terminated_together_within_the_wait_even_on_a_network_that_times_out(panel, fake,
                                                                                                   monkeypatch):
    """Slicer's window waits for end_started_here: one pod after another, each with its retries, would hold
    it for minutes when RunPod does not answer."""
    from SegmentationMachineLib.panels import cloud

    keyed(panel)
    for gpu in ("NVIDIA L40S", "NVIDIA GeForce RTX 4090"):
        panel.start(gpu, "server")
        settle(panel)
    pods = list(panel.started_here)
    assert len(pods) == 2 and set(pods) <= set(fake.pods)
    monkeypatch.setattr(cloud, "QUIT_WAIT_S", 2.0)
    fake.stalled = True
    try:
        started = time.monotonic()
        problems = panel.end_started_here()
        assert time.monotonic() - started < 6.0  # a stalled RunPod would hold it forever
        assert problems == [f"{pod}: RunPod did not answer within 2 s" for pod in pods]
    finally:
        fake.stalled = False
    assert panel.end_started_here() == [] and fake.pods == {}  # answered now: both terminated
    assert panel.started_here == []


def test_cancel_while_starting_terminates_the_pod(panel, fake):
    fake.server_s = 3600
    keyed(panel)
    panel.start("NVIDIA L40S", "server")
    while not fake.pods:
        time.sleep(0.05)
    panel.cancel()
    settle(panel)
    assert panel.status == "Cancelled: the pod being started was terminated." and fake.pods == {}
    assert panel.records.all() == {}


def test_a_pod_in_error_ends_the_start_at_once_with_the_sentence(panel, fake):
    keyed(panel)
    fake.fails_as = "ERROR"
    started = time.monotonic()
    panel.start("NVIDIA L40S", "server")  # with the default 10 min ready time-out
    settle(panel, timeout=30)
    assert time.monotonic() - started < 20
    assert panel.status.startswith("RunPod reports the pod as ERROR while pulling the image: it was terminated")
    assert fake.pods == {} and panel.records.all() == {} and panel.pod is None


def test_a_pod_terminated_elsewhere_is_not_listed_as_still_there(panel, fake):
    keyed(panel)
    panel.start("NVIDIA L40S", "server")
    settle(panel)
    pod_id = panel.pod.pod_id
    time.sleep(fake.list_lag_s)
    panel.backend_factory(RUNPOD_KEY).terminate(pod_id)  # in RunPod's console, say: RunPod lists it as TERMINATED
    later = CloudPanel(panel.store, PodRecords(panel.records.path))
    later.refresh()
    settle(later)
    assert pod_id in fake.ended and later.earlier == [] and later.status == "Choose a GPU type and press Start."
    assert later.records.all() == {}


def test_pods_from_an_earlier_session_are_listed_and_can_be_used_or_terminated(panel, fake, tmp_path):
    keyed(panel)
    panel.start("NVIDIA L40S", "server")
    settle(panel)
    pod_id = panel.pod.pod_id
    later = CloudPanel(panel.store, PodRecords(panel.records.path))  # Slicer restarted
    later.refresh()
    settle(later)
    assert [p.id for p, cost in later.earlier] == [pod_id] and "still there" in later.status
    later.connect_earlier(pod_id)
    assert later.tick().server_url == panel.pod.server_url
    later.terminate(pod_id)
    settle(later)
    assert fake.pods == {} and later.pod is None and later.earlier == []


def test_a_stopped_pod_from_earlier_is_resumed_on_connect(panel, fake):
    keyed(panel)
    panel.start("NVIDIA L40S", "server")
    settle(panel)
    pod_id = panel.pod.pod_id
    panel.stop()
    settle(panel)
    assert fake.pods[pod_id]["status"] == "EXITED" and [p.status for p, c in panel.earlier] == ["EXITED"]
    assert panel.balance.startswith("Spending $0.00/h now")  # asked again after the stop
    panel.connect_earlier(pod_id)
    ready = settle(panel)
    assert ready.pod_id == pod_id and fake.pods[pod_id]["status"] == "RUNNING" and panel.started_here == [pod_id]
    assert panel.status.startswith(f"Pod {pod_id} is ready on NVIDIA L40S at $0.86/h: ")
    assert panel.balance.startswith("Spending $0.86/h now")  # and after the resume


def test_ready_names_the_gpu_and_its_rate_and_a_pod_its_agent_stopped_counts_as_ended_at_quit(panel, fake):
    keyed(panel)
    fake.list_lag_s = 60.0  # RunPod's list lags behind the create: the new pod's rate counts all the same
    panel.start("NVIDIA L40S", "desktop")
    settle(panel)
    pod_id = panel.pod.pod_id
    assert panel.status == f"Pod {pod_id} is ready on NVIDIA L40S at $0.86/h: {panel.pod.server_url}"
    assert panel.balance == "Spending $0.86/h now (the balance is in the RunPod console)"
    RunPodRest(RUNPOD_KEY).stop(pod_id)  # by its agent: idle, budget or lifetime, as a desktop pod with files ends
    assert panel.end_started_here() == [] and fake.pods[pod_id]["status"] == "EXITED"  # stopped: not "could not end"


def test_no_status_or_log_line_of_the_panel_carries_the_key(panel, fake, caplog):
    """The leak test, in process: every status the user saw, every log record at DEBUG, every error's traceback."""
    import logging
    import traceback

    caplog.set_level(logging.DEBUG)
    fake.rate_limit_every, fake.create_fault = 4, (500, "Internal Server Error")
    statuses, errors = [], []

    def run(action, *args):
        action(*args)
        while panel.busy:
            task = panel.task
            panel.tick()
            statuses.append(panel.status)
            if task.done() and task.error:
                errors.append("".join(traceback.format_exception(task.error)))
            time.sleep(0.05)
        statuses.append(panel.status)

    run(panel.save_key, "rpa_WRONGKEY_never_shown")
    run(panel.save_key, RUNPOD_KEY)
    run(panel.start, "NVIDIA L40S", "desktop")
    run(panel.stop)
    run(panel.terminate, "pod9999x")  # no such pod: an error sentence
    assert errors and "RunPod rejected the API key" in errors[0] and len(fake.pods) == 1
    seen = "\n".join(statuses + errors) + caplog.text
    assert "rpa_WRONGKEY_never_shown" not in seen and RUNPOD_KEY not in seen


def slow_list(fake, monkeypatch, seconds=1.5):
    """RunPod slow to list the account's pods: a start asks for its spending once its pod is ready."""
    answer = fake.handle

    def slowly(method, path, authorization, body):
        done = answer(method, path, authorization, body)
        if method == "GET" and path.split("?")[0].rstrip("/").endswith("/v2/pods"):
            time.sleep(seconds)
        return done

    monkeypatch.setattr(fake, "handle", slowly)


def wait_for_ready(panel):
    from SegmentationMachineLib.cloud.podstart import Phase

    deadline = time.monotonic() + 60
    while not (panel.progress and panel.progress.phase == Phase.READY):
        assert time.monotonic() < deadline, panel.status
        time.sleep(0.02)


def test_quit_or_cancel_as_a_start_finishes_ends_the_pod_it_made(panel, fake, monkeypatch):
    """The start's pod is ready and the start asks for the account's spending: a start whose work has returned is
    finished at quit (its pod is ended), and Cancel then ends the pod instead of using it."""
    keyed(panel)
    slow_list(fake, monkeypatch)
    panel.start("NVIDIA L40S", "server")
    wait_for_ready(panel)
    assert panel.end_started_here() == [] and fake.pods == {} and panel.started_here == [] and panel.pod is None
    panel.start("NVIDIA L40S", "server")
    wait_for_ready(panel)
    panel.cancel()
    settle(panel)
    assert panel.pod is None and panel.heartbeat is None and fake.pods == {}
    assert panel.status.startswith("Cancelled: the pod being started was terminated.")


def test_a_pod_its_agent_ended_is_released_said_and_not_a_failure_at_quit(panel, fake, monkeypatch):
    """Slicer stayed open while the agent ended the pod (idle): the panel says so and offers Start again, and quit
    does not report a pod that is already gone."""
    from SegmentationMachineLib.cloud import heartbeat

    monkeypatch.setattr(heartbeat, "INTERVAL_S", 0.3)
    keyed(panel)
    panel.start("NVIDIA L40S", "desktop")
    settle(panel)
    pod_id = panel.pod.pod_id
    RunPodRest(RUNPOD_KEY).terminate(pod_id)  # as its agent ends a desktop pod without files; its answers said 900 s
    ticked_until_ended(panel)  # RunPod is asked, once the heartbeat fails
    assert panel.status == f"Pod {pod_id} has ended: RunPod no longer has it. Choose a GPU type and press Start."
    assert panel.end_started_here() == []  # not "There is no pod"

    fake.agent_ends_in_s = 0.2  # the agent's last answer: the pod ends before the next beat
    panel.start("NVIDIA L40S", "server")
    settle(panel)
    pod_id = panel.pod.pod_id
    time.sleep(0.5)
    RunPodRest(RUNPOD_KEY).terminate(pod_id)
    ticked_until_ended(panel)
    assert panel.status == f"Pod {pod_id} has ended: idle timeout. Choose a GPU type and press Start."
    assert panel.end_started_here() == []


def test_terminate_asks_first_naming_what_a_desktop_pods_volume_loses_and_that_stop_keeps_it(tmp_path):
    """Terminate was one click from deleting a desktop pod's uploads, scenes and exports; the widget asks this first."""
    from SegmentationMachineLib.cloud.pods import Pod

    records = PodRecords(tmp_path / "pods.json")
    for pod_id, mode in (("desk0001", "desktop"), ("serv0001", "server")):
        records.add(Pod(pod_id, "n", "RUNNING", "g", 0.69, 0, True, []), 0.0, mode=mode)
    panel = CloudPanel(SecretStore(tmp_path / "secrets", use_keychain=False), records)
    desktop = panel.terminate_question("desk0001")
    assert desktop.startswith("Terminate pod desk0001? This deletes its volume for good: the uploads, scenes and "
                              "exports on it.") and "Stop keeps them" in desktop
    assert "(if it is a desktop pod)" in panel.terminate_question("else001")  # started elsewhere: may be one
    server = panel.terminate_question("serv0001")
    assert server.startswith("Terminate pod serv0001?") and "uploads" not in server


def test_the_start_can_have_a_desktop_pods_uploads_wiped_at_its_end_and_refuses_it_for_a_server_pod(panel, fake):
    """The Cloud GPU section's "wipe uploads at end" reaches the pod's agent as SM_WIPE_AT_END, desktop pods only."""
    from SegmentationMachineLib.cloud.cloudgpu import Limits

    keyed(panel)
    panel.start("NVIDIA L40S", "server", Limits(wipe_at_end=True))
    settle(panel)
    assert panel.status.startswith("Wiping the uploads at the end is for desktop pods") and fake.pods == {}
    panel.start("NVIDIA L40S", "desktop", Limits(wipe_at_end=True))
    settle(panel)
    assert fake.pods[panel.pod.pod_id]["env"]["SM_WIPE_AT_END"] == "1"
    assert panel.end_started_here(keep_desktop_files=False) == [] and fake.pods == {}


def test_stop_and_quit_have_a_wiping_pods_agent_wipe_then_end_it_or_say_the_uploads_stay(panel, fake, tmp_path,
                                                                                        monkeypatch, caplog):
    """The panel's Stop of a pod started with "wipe uploads at end" asks its agent (the real one, and its wiper) to
    end it: wiped, then stopped. At quit, a pod whose agent does not answer is stopped through RunPod all the same, and
    the log says that its uploads were NOT wiped."""
    from pod_proxy import PodProxy
    from SegmentationMachineLib.cloud.cloudgpu import AGENT_PORT, Limits
    from SegmentationMachineLib.cloud.podagent import AGENT_FOLDER
    from test_podagent import WIPED, kill_started, uploaded, wiping_agent

    proxy = PodProxy(fake)  # to the real agent of a pod once routed, else to the fake's stand-ins
    monkeypatch.setenv("SM_RUNPOD_PROXY_URL", proxy.template())
    try:
        keyed(panel)
        started = []
        for _ in range(2):
            panel.start("NVIDIA L40S", "desktop", Limits(wipe_at_end=True))
            settle(panel)
            started.append(panel.pod.pod_id)
            volume = fake.volumes[started[-1]] = tmp_path / f"volume-{started[-1]}"
            (volume / AGENT_FOLDER).mkdir(parents=True)
            uploaded(volume, tmp_path / f"outside-{started[-1]}")
            (volume / "exports").mkdir()
            (volume / "exports/skull.stl").write_bytes(b"the user's work")
        first, second = started  # the second is in use now
        agent = wiping_agent(fake, second, tmp_path / "run", fake.pods[second]["env"]["SM_HEARTBEAT_TOKEN"])
        proxy.route(second, AGENT_PORT, agent.port)
        panel.stop()
        assert panel.status == f"Stopping pod {second} (its agent wipes the uploads first: up to a few minutes)..."
        settle(panel, timeout=120)
        assert fake.pods[second]["status"] == "EXITED" and "Stopping pod" in agent.log()
        assert [sorted(p.name for p in (fake.volumes[second] / f).iterdir()) for f in WIPED] == [[]] * len(WIPED)
        assert (fake.volumes[second] / "exports/skull.stl").read_bytes() == b"the user's work"
        assert panel.status.startswith(f"Stopped pod {second}: no GPU billing; its 50 GB volume costs $10.00/month")
        assert ("). Its agent asked for the uploaded DICOM to be wiped before it ended the pod; the pod's log says "
                "whether all of it was deleted.") in panel.status and "NOT" not in panel.status

        fake.agent_answers = False  # the first pod's agent cannot be reached
        assert panel.started_here == [first] and panel.end_started_here() == []
        assert fake.pods[first]["status"] == "EXITED" and (fake.volumes[first] / "inbox/Doe Jane").is_dir()
        assert (f"Pod {first} at quit: The uploads on its volume were NOT wiped (its agent did not answer, so it was "
                f"stopped through RunPod): `segmentation-machine pod down {first}` deletes them") in caplog.text
    finally:
        proxy.close()
        kill_started()


def test_a_pod_stopped_from_runpods_console_is_said_ended_and_offered_to_resume(panel, fake, monkeypatch):
    """A pod RunPod lists as stopped (EXITED, not gone) was never taken for ended: the heartbeat's failure stayed on
    screen for ever, Start was not offered, and the stopped pod was not listed to resume."""
    from SegmentationMachineLib.cloud import heartbeat

    monkeypatch.setattr(heartbeat, "INTERVAL_S", 0.3)
    keyed(panel)
    panel.start("NVIDIA L40S", "desktop")
    settle(panel)
    pod_id = panel.pod.pod_id
    RunPodRest(RUNPOD_KEY).stop(pod_id)  # from RunPod's console
    ticked_until_ended(panel)
    assert panel.status == (f"Pod {pod_id} has ended: RunPod lists it as stopped. 1 pod(s) started earlier are still "
                            "there: connect to or terminate them below.")
    assert [(p.id, p.status) for p, _cost in panel.earlier] == [(pod_id, "EXITED")]


def test_quit_during_a_resume_stops_the_pod_again(panel, fake):
    """Quit cancelled a start but not a resume: the resumed pod, not yet among this session's pods, ran on and
    billed after Slicer had quit."""
    keyed(panel)
    panel.start("NVIDIA L40S", "desktop")
    settle(panel)
    pod_id = panel.pod.pod_id
    panel.stop()
    settle(panel)
    fake.server_s = 3600  # the resumed pod's server never answers: the resume waits
    panel.connect_earlier(pod_id)
    deadline = time.monotonic() + 30
    while fake.pods[pod_id]["status"] != "RUNNING" or panel.progress is None:
        assert time.monotonic() < deadline, panel.status
        time.sleep(0.05)
    assert panel.busy and panel.end_started_here() == []
    assert fake.pods[pod_id]["status"] == "EXITED" and not panel.busy
    assert panel.status == "Cancelled: the pod was stopped again, its volume kept."
