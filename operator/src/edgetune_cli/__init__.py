"""``kubectl edgetune``: the kubectl plugin (``kubectl-edgetune`` on PATH). See ``__main__``."""
