"""Check a DeepSpeed hostfile before launching (the launch/*.sh scripts run it):

lilt-check-hostfile launch/hostfile.example
"""

from lilt_ds.cli import ArgumentParser, run


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("hostfile")
    args = parser.parse_args(argv)

    from lilt_ds.hostfile import parse_hostfile

    hosts = parse_hostfile(args.hostfile)
    print(
        f"{args.hostfile}: {len(hosts)} node(s), {sum(hosts.values())} process(es): "
        + ", ".join(f"{h} ({n})" for h, n in hosts.items())
    )


def entry():
    """The ``lilt-check-hostfile`` console script."""
    run(main)


if __name__ == "__main__":
    run(main)
