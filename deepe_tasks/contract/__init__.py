"""The method contract, shared by the submit side and the job process: the parameters, a method's
declared parameters, the static check, DeepExtension files, the method store, and what submit
refuses. Torch-free: it imports only deepe_tasks.core."""
