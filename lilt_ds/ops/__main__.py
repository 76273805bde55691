from ..errors import moved_command

raise SystemExit(moved_command("launch/build_kernels.py"))
