"""The metric tags that more than one file names: the phases write them, the callbacks, the detectors, the plots,
the report and the pipeline's summary read them.

The rule: a tag read by another file than the one that writes it lives here, and both files use the constant. A tag
written and read in one place only (``perf/*``, ``value/*``, ``sft/*``, most ``rm/*``, ``diagnostics/*``) stays a
literal where it is logged. The values are the public names in TensorBoard: never change one (a run's event files,
the detectors' evidence and the tests name them).
"""

# -- objective/*: the PPO rollout's reward and KL (modules/ppo.py, modules/ppo_eval.py, modules/ppo_passes.py) -----
KL = "objective/kl"  # mean KL of the rollout's responses to the reference, summed over tokens (nats per sequence)
KL_COEF = "objective/kl_coef"  # beta, the KL controller's coefficient used for the iteration's rollout
KL_COEF_AT_BOUND = "objective/kl_coef_at_bound"  # 1 while the adaptive controller's beta sits at kl.min/max_coef
PROXY_REWARD = "objective/proxy_reward"  # mean reward-model (proxy) score of the rollout's responses
GOLD_REWARD = "objective/gold_reward"  # mean gold-judge score of the rollout's responses (with a gold judge)
ENSEMBLE_STD = "objective/ensemble_std"  # the reward ensemble's mean disagreement on the rollout (an ensemble only)
ENTROPY = "objective/entropy"  # the policy's mean per-token entropy over the update's minibatches

# -- rollout/*: the rollout's responses (modules/ppo_eval.py) -----------------------------------------------------
LENGTH_MEAN = "rollout/length_mean"  # mean response length of the rollout (tokens)
SCORE_LENGTH_CORR = "rollout/score_length_corr"  # Pearson correlation of the rollout's scores and lengths
DUPLICATE_RATE = "rollout/duplicate_rate"  # fraction of responses identical to another prompt's response

# -- policy/*: the PPO update (modules/ppo_passes.py) ---------------------------------------------------------------
APPROX_KL = "policy/approx_kl"  # approximate KL of the updated policy to the rollout's (per minibatch step)

# -- diversity/*: diversity of the policy's responses (metrics/diversity.py, modules/ppo_eval.py) -------------------
DIVERSITY = "diversity"  # prefix of diversity_metrics' keys on the rollout (across inputs)
DISTINCT_2 = "diversity/distinct_2"  # distinct bigrams / bigrams over the rollout's responses (across inputs)
SELF_BLEU = "diversity/self_bleu"  # self-BLEU-4 of the rollout's responses (higher: less diverse)
EAD = "diversity/ead"  # expectation-adjusted distinct unigrams of the rollout's responses
PER_INPUT = "diversity/per_input"  # prefix of the per-input diversity of the policy on held-out prompts
PER_INPUT_DISTINCT_2 = "diversity/per_input_distinct_2"  # distinct-2 among the k samples of one prompt, averaged
PER_INPUT_SELF_BLEU = "diversity/per_input_self_bleu"  # self-BLEU among the k samples of one prompt, averaged

# -- eval/*: the PPO policy against the SFT policy on held-out prompts (modules/ppo_eval.py) ------------------------
EVAL_PROXY_REWARD = "eval/proxy_reward"  # mean conservative proxy score of the policy's held-out responses
EVAL_GOLD_REWARD = "eval/gold_reward"  # mean gold score of the policy's held-out responses
EVAL_SFT_PROXY_REWARD = "eval/sft_proxy_reward"  # the same proxy score of the SFT policy's responses
EVAL_SFT_GOLD_REWARD = "eval/sft_gold_reward"  # the same gold score of the SFT policy's responses
EVAL_WIN_RATE = "eval/win_rate"  # fraction of prompts where the policy's gold beats SFT's (ties count half)
EVAL_GOLD_REWARD_SE = "eval/gold_reward_se"  # standard error of eval/gold_reward (std / sqrt(prompts))
EVAL_PROXY_WIN_RATE = "eval/proxy_win_rate"  # fraction of prompts where the policy's proxy beats SFT's (ties half)
EVAL_AUDIT_WIN_RATE = "eval/audit_win_rate"  # fraction of audited prompts where a fresh label prefers the policy
EVAL_AUDIT_LABELS = "eval/audit_labels"  # how many fresh labels eval/audit_win_rate is the mean of
EVAL_SFT_LENGTH_MEAN = "eval/sft_length_mean"  # mean length of the SFT policy's held-out responses (tokens)
EVAL_KL = "eval/kl"  # mean KL of the policy's held-out responses to the SFT policy, nats per response
EVAL_LENGTH_MEAN = "eval/length_mean"  # mean length of the policy's held-out responses (tokens)
EVAL_SFT_PER_INPUT = "eval/sft_per_input"  # prefix of the SFT policy's per-input diversity
EVAL_SFT_PER_INPUT_DISTINCT_2 = "eval/sft_per_input_distinct_2"  # PER_INPUT_DISTINCT_2 of the SFT policy
EVAL_SFT_PER_INPUT_SELF_BLEU = "eval/sft_per_input_self_bleu"  # PER_INPUT_SELF_BLEU of the SFT policy

# -- dpo/*: the DPO phase (modules/dpo.py), read by the detectors to know a DPO run ----------------------------------
DPO_LOSS = "dpo/loss"  # DPO's loss on the training batches
DPO_VAL_MARGINS = "rewards/val_margins"  # mean implicit-reward margin (chosen - rejected) on the held-out pairs

# -- rm/*: the reward phase on held-out pairs (modules/reward.py), read by the pipeline's summary -------------------
RM_ACCURACY = "rm/accuracy"  # pairwise accuracy of the reward model against the annotators' labels
RM_BASELINE_ACCURACY = "rm/baseline_accuracy"  # the same accuracy of the bag-of-words baseline (metrics/baseline.py)
RM_BAYES_ACCURACY = "rm/bayes_accuracy"  # the best accuracy possible under the annotators' noise (Bayes)
