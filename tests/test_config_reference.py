"""README.md's config reference is generated from the models; keep them in sync."""

from pathlib import Path

from elastic_ckpt.config.reference import reference_markdown


def test_readme_holds_the_current_config_reference() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert reference_markdown() in readme, (
        "README.md's config table is stale: paste `python -m elastic_ckpt.config.reference`")
