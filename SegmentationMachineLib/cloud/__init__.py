"""RunPod pods: the adapter, starting, heartbeats, and the agent inside the pod."""
