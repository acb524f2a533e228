"""Scheduled rebuilds: cron slots in UTC, triggers that decide whether a slot is worth running,
and the systemd units (or crontab line) that tick the scheduler every minute."""
