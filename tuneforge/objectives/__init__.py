"""Training objectives as pure functions of tensors.

Each module holds one family of losses (``dpo``, ``reward``, ``grpo``, ``ppo``, ``distill``, ``sft``) written as
plain functions of log-probs, logits, masks and rewards, so the one training loop can call any of them. A loss
function returns ``(loss, metrics)`` where ``metrics`` maps names to detached scalar tensors: nothing here calls
``.item()``, so the loop decides when to synchronise with the device.

``logprobs`` turns logits into the per-token and per-sequence log-probabilities the losses consume.
"""
