"""The stages: each a module or a package here, none importing another (tests/test_structure.py).

The table says which function runs each training stage; it is read by the worker and by
preflight, by name, so that neither imports a stage (nor torch) before it runs one.
"""

STAGE_RUNNERS = {
    "sft": "rlhf_cli.stages.sft:run_sft",
    "rm": "rlhf_cli.stages.rm:run_rm",
    "dpo": "rlhf_cli.stages.dpo:run_dpo",
    "ppo": "rlhf_cli.stages.ppo.run:run_ppo",
    "rft": "rlhf_cli.stages.rft.run:run_rft",
    "rrhf": "rlhf_cli.stages.rrhf:run_rrhf",
}
