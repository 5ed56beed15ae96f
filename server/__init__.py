"""The HTTP server: the reference implementation's ``/v1`` API over the library, with a real queue, progress,
cancel, SQLite persistence and input confinement.

Start it with ``python -m aitk_inference serve`` (see ``SERVER.md``). Importing this package imports nothing heavy;
FastAPI is imported by :mod:`.main`, torch only when the worker runs its first task.
"""
