// Renders chat templates with Hugging Face's @huggingface/jinja, the reference for
// tests/test_chat_template.py (the client renders with Python's jinja2).
//   node render_chat.mjs < request.json > texts.json
// stdin: {"template": "...", "now": [year, month (1-12), day, hour, minute] or null,
//         "cases": [{...template variables: messages, add_generation_prompt, bos_token, ...}]}
// stdout: a JSON array of the rendered texts, one per case.
// "now" pins the clock that the library's own strftime_now global reads (local time), so a
// template that prints today's date renders the same date on both sides.
import { readFileSync } from "node:fs";
import { Template } from "@huggingface/jinja";

const request = JSON.parse(readFileSync(0, "utf8"));
if (request.now) {
  const [year, month, day, hour, minute] = request.now;
  const pinned = new Date(year, month - 1, day, hour, minute).getTime();
  const RealDate = Date;
  globalThis.Date = class extends RealDate {
    constructor(...args) {
      super(...(args.length > 0 ? args : [pinned]));
    }
    static now() {
      return pinned;
    }
  };
}
const template = new Template(request.template);
const texts = request.cases.map((variables) => template.render(variables));
process.stdout.write(JSON.stringify(texts));
