"""nnInteractive: the session against the server, prompt geometry, prompt files."""
