"""Cross-checks between the store and Docker's own records (filled in below)."""


def check_docker(checker, docker_root: str, grace: float) -> None:
    raise NotImplementedError("Docker cross-checks are not written yet")
