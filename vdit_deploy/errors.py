"""The one error type users see: the CLI prints its message on one line and exits non-zero."""


class VditError(Exception):
    """A problem with the user's input or artifacts, explained in one line."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """`Type: first line` of the real cause of a library's exception: the innermost of its __cause__ /
    __context__ chain (torch.export wraps the failing op's error in "Failed to export ... step 1/3")."""
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {text[:limit]}" if text else type(e).__name__
