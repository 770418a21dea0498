"""Keeping a pod running while its nnInteractive server is in use, whoever started the pod.

A client that knows only a server's URL and key (the AI prompts section) heartbeats the pod's agent as the
Cloud GPU section does. RunPod's proxy names both by pod and port, so the agent's address follows from the
server's. The credential is the heartbeat token where the pod was started from this computer (its records),
else the server's key, which the agent accepts too: whoever may use the server may keep it running.
"""

from .cloudgpu import AGENT_PORT, recorded_pod
from .heartbeat import Heartbeat
from .podstart import PodRecords, pod_at, proxy_url


def heartbeat_note(heartbeat) -> str:
    """The pod's warning that it ends soon, or why the heartbeats do not keep it running; "" otherwise."""
    if heartbeat is None:
        return ""
    if heartbeat.refused:
        return ("The pod's agent refused these heartbeats (a pod from an older image takes only its own heartbeat "
                "token): the pod ends after its idle timeout unless the Cloud GPU section or `segmentation-machine "
                "pod up` stays connected to it.")
    return keep_advice(heartbeat.warning)


def keep_advice(warning: str) -> str:
    """The agent's warning, with how to keep the pod where it ends as unused."""
    if "(idle timeout)" not in warning:
        return warning
    return f"{warning} A prompt, or Refresh in the Cloud GPU section, keeps it."


def pod_heartbeat(server_url: str, api_key: str, records: PodRecords, watches_use: bool = False):
    """The (not yet started) Heartbeat that keeps the pod behind server_url running; None for any other server.
    watches_use: see Heartbeat."""
    pod_id = pod_at(server_url)
    if not pod_id:
        return None
    started_here = recorded_pod(records, pod_id)
    if started_here is not None:
        return Heartbeat(started_here.agent_url, started_here.secrets["SM_HEARTBEAT_TOKEN"], watches_use)
    return Heartbeat(proxy_url(pod_id, AGENT_PORT), api_key, watches_use)
