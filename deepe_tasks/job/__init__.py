"""The job process: the zygote that forks it, the process that runs one attempt, the runner
that executes a method, its callback and phases, and the pipe protocol (ipc) to the worker."""
