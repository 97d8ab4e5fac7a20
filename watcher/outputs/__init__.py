"""What the agent shows the world: one status value rendered to the status file, sd_notify,
metrics and the agent check; the logging pipeline and its sinks."""
