"""Usage errors of the subcommands name only the arguments that are really required."""

from __future__ import annotations

import pytest

from moe_plugin.cli.main import main


@pytest.mark.parametrize(
    ("argv", "required"),
    [(["generate"], "ckpt, prompt"), (["generate", "x.ckpt"], "prompt")],
)
def test_optional_overrides_are_not_listed_as_required(
    capsys: pytest.CaptureFixture[str], argv: list[str], required: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"the following arguments are required: {required}\n" in err
    assert "overrides" not in err.splitlines()[-1]
