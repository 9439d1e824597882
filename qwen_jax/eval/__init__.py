"""Evaluation: the toy world's analytic evaluator (`toy_metrics`).

    from qwen_jax.eval.toy_metrics import evaluate, reference_stats, format_table
    from qwen_jax.toy import all_prompts, real_set
    reference = reference_stats(*real_set(all_prompts(), seeds_per_prompt=16, seed=1))
    metrics = evaluate(generated_images, captions, reference)   # uint8 or float in [0, 1]
    print(format_table(metrics))                                # accuracy, clean, diversity, toy_fd
"""
