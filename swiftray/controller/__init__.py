"""The driver: the only place that sequences roles. `sft.py` (dataset-fed: SFT, DPO, KTO, ORPO, SimPO, CPO,
RM) and `rl.py` (generated rollouts: GRPO, DAPO)."""

from swiftray.controller.sft import run_dataset, run_sft


def run_rlhf(args):
    """`swiftray rlhf`: the dataset loop or the RL loop, by the algorithm's data source."""
    from swiftray.algorithms import get_algorithm
    from swiftray.rewards import load_external_plugins

    load_external_plugins(args.external_plugins)  # may register the algorithm
    if get_algorithm(args.rlhf_type).data_source == "dataset":
        from swiftray.controller.rl_data import ship_plugins_by_value

        ship_plugins_by_value()  # a plug-in algorithm's loss travels to the policy actors
        return run_dataset(args)
    from swiftray.controller.rl import run_rlhf as _run  # imported lazily: the RL roles pull in more

    return _run(args)


__all__ = ["run_dataset", "run_rlhf", "run_sft"]
