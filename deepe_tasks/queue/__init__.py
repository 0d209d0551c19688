"""The submitting side: what a backend needs to submit and watch jobs, without PyTorch."""
