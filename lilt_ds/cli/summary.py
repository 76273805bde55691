"""What a config trains, counted without loading any weight (works offline for every preset):

lilt-summary --config lilt --overrides vision_encoder=base text_encoder=base
"""

from lilt_ds.cli import ArgumentParser, run


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="demo", help="preset name or YAML path")
    parser.add_argument("--overrides", nargs="*", default=[], help="key=value or +key=value")
    args = parser.parse_args(argv)

    from lilt_ds.config import load_config
    from lilt_ds.models import build_model, format_summary, trainable_summary

    cfg = load_config(args.config, args.overrides)
    model = build_model(cfg, load_weights=False, device="meta")
    print(
        f"config {args.config}: mode={cfg.mode} vision={cfg.model.vision.name} text={cfg.model.text.name} "
        f"image_size={cfg.model.image_size}"
    )
    print(format_summary(trainable_summary(model)))


def entry():
    """The ``lilt-summary`` console script."""
    run(main)


if __name__ == "__main__":
    run(main)
