"""The planner: every ``auto`` of a recipe resolved and explained, and a forecast of peak memory and time.

``hardware`` (the device and its memory) · ``shape`` (a model's sizes from its config) · ``workload`` (what a step
puts through the model) · ``memory`` and ``timing`` (the two models) · ``resolve`` (the ``auto`` rules) ·
``forecast`` (the forecast, the fit check, the report) · ``calibrate`` and ``measure`` (what really happened) ·
``cli`` (``tuneforge plan``).
"""
