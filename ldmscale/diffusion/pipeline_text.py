"""MiniLM as ldmscale encodes prompts (token states zeroed at the padding), as a text encoder that
StableDiffusionPipeline can call. `ldmscale export` copies this file into the exported pipeline as
text_encoder/ldmscale_text.py, so the pipeline needs only diffusers and transformers, loaded with
trust_remote_code=True (without it, diffusers refuses to load the folder rather than encode prompts wrongly).
Keep it self-contained: transformers imports only.
"""

from transformers import BertModel


class MiniLMTextEncoder(BertModel):
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).long()
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        out["last_hidden_state"] = out.last_hidden_state * attention_mask[..., None].to(out.last_hidden_state.dtype)
        return out
