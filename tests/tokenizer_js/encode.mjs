// Encodes and decodes texts with Hugging Face's tokenizers.js, the reference for
// tests/test_tokenizer_reference.py.
//   node encode.mjs path/to/tokenizer.json < texts.json > results.json
// stdin: a JSON array of strings. stdout: [{"ids": [...], "decoded": "..."}, ...], encoded
// without special tokens (the caller compares against prepend_bos=false) and decoded with them.
import { readFileSync } from "node:fs";
import { Tokenizer } from "@huggingface/tokenizers";

const tokenizer = new Tokenizer(JSON.parse(readFileSync(process.argv[2], "utf8")), {});
const texts = JSON.parse(readFileSync(0, "utf8"));
const results = texts.map((text) => {
  const ids = tokenizer.encode(text, { add_special_tokens: false }).ids;
  // decode() refuses an empty list; the empty text decodes to "".
  // Without clean_up_tokenization_spaces (a transformers-level rewrite such as " ." -> ".",
  // which tokenizers.js applies by default): the decoder's own output, which must be the text.
  const decoded = ids.length > 0
    ? tokenizer.decode(ids, { skip_special_tokens: false, clean_up_tokenization_spaces: false })
    : "";
  return { ids, decoded };
});
process.stdout.write(JSON.stringify(results));
