"""The Ray jobs, one entrypoint each (``python -m hiar.jobs.<name>``): generate, pretrain_teacher, train,
evaluate, promote.
"""
