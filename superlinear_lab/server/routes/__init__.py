"""The HTTP endpoints, one router per resource: `info` (health, server stats, models), `chat`
(/v1/chat/completions), `completions` (/v1/completions), `sessions`, `snapshots`."""
