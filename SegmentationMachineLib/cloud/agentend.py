"""A user's own stop of a pod started with the wipe (`pod up --mode desktop --wipe-at-end`) goes through its agent.

RunPod's stop ends the container as it is: the uploaded DICOM would stay on the volume. So the client asks the pod's
agent to end the pod now (`POST /end`, the heartbeat token in the Authorization header as heartbeats carry it, never in
the URL); the agent has the uploads wiped, then stops or terminates the pod as at its own end, and the client waits
until RunPod no longer lists the pod running. An agent that does not take the request (the pod unreachable, an image
from before) or has not ended the pod in time leaves the stop to RunPod: the GPU bill ends whatever happens.
"""

import time

from . import wipe
from .pods import PodsError

ASK_TIMEOUT_S = 15.0
# The agent's wait for its wiper, then its own stop or terminate, and RunPod's list catching up.
END_WAIT_S = wipe.WAIT_S + 60.0
GONE = "TERMINATED"  # RunPod lists a terminated pod so for a few seconds, then no longer


def ask_agent_to_end(agent_url: str, token: str, timeout_s: float = ASK_TIMEOUT_S) -> bool:
    """Whether the pod's agent took the request to end the pod now: False where it did not answer, refused the token,
    or is from an image that does not know the request (RunPod's proxy page, a 404)."""
    import requests

    try:
        answer = requests.post(f"{agent_url.rstrip('/')}/end", headers={"Authorization": f"Bearer {token}"},
                               timeout=max(1.0, timeout_s))
    except requests.RequestException:
        return False
    try:
        return answer.status_code == 202 and answer.json().get("ending") is True
    except (ValueError, AttributeError):
        return False


def wait_until_ended(backend, pod_id: str, deadline: float, poll_s: float, sleep=time.sleep, clock=time.monotonic):
    """(ended, pod): ended once RunPod lists the pod stopped (pod: as listed) or no longer has it (pod: None); by the
    deadline (a clock() time) not ended, with the pod as last read (None where RunPod did not answer)."""
    last = None
    while True:
        sleep(max(0.0, min(poll_s, deadline - clock())))
        try:
            last = backend.get(pod_id)
        except PodsError:  # RunPod hiccups: asked again until the deadline
            last = None
        else:
            if last is None or last.status == GONE:
                return True, None
            if last.status == "EXITED":
                return True, last
        if clock() >= deadline:
            return False, last
