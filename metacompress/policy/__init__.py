"""The meta-learned compression policy: per-group pruning ratios and repair settings.

``features`` describes each prunable group in architecture-agnostic terms, ``network`` maps
descriptors + budget + repair regime to ratios (projected onto the exact budget) and repair
settings, ``tasks`` generates the compression tasks it is meta-trained on, ``meta_train``
trains it with antithetic evolution strategies (ES-MAML for fast adaptation), ``store``
saves and loads it without pickle (safetensors + JSON).
"""
