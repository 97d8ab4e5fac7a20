"""The command line: argparse, the subcommands, drain waits, the monitoring-plugin verdict,
durations."""
