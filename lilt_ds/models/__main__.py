from ..errors import moved_command

raise SystemExit(moved_command("launch/summary.py"))
