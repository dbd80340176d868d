//! Chat formatting with the model file's own Jinja template (`tokenizer.chat_template`),
//! rendered as Hugging Face does (trim_blocks, lstrip_blocks, Python string methods).
//! Files without a template (base models) get plain text: the messages joined by blank lines.
//! Reasoning models' templates read `enable_thinking` (Qwen3: off renders an empty
//! `<think></think>` after the assistant header); [`ChatTemplate::set_thinking`] sets it, and
//! unset it is left undefined, as the template's own default expects.

use crate::{Result, TokenizerError};
use candle_core::quantized::gguf_file::Value;
use serde::Serialize;
use std::collections::HashMap;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

#[derive(Debug)]
pub enum ChatTemplate {
    Jinja {
        env: Box<minijinja::Environment<'static>>,
        bos: String,
        eos: String,
        /// Whether the template reads `enable_thinking` at all.
        reads_thinking: bool,
        thinking: Option<bool>,
    },
    Plain,
}

const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    /// Builds the template from a GGUF file's metadata; `bos`/`eos` are the texts of the file's
    /// BOS/EOS tokens, which templates may print.
    pub fn from_gguf_metadata(md: &HashMap<String, Value>, bos: &str, eos: &str) -> Result<Self> {
        match md
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
        {
            Some(source) => Self::jinja(source, bos, eos),
            None => Ok(Self::Plain),
        }
    }

    pub fn jinja(source: &str, bos: &str, eos: &str) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("default delimiters are valid"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |fmt: String| -> String {
            strftime_now(&fmt)
        });
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| {
                TokenizerError::Template(format!("the model's chat template does not parse: {e}"))
            })?;
        Ok(Self::Jinja {
            env: Box::new(env),
            bos: bos.to_string(),
            eos: eos.to_string(),
            reads_thinking: source.contains("enable_thinking"),
            thinking: None,
        })
    }

    /// Renders with `enable_thinking` set (`None`: undefined, the template's default). A
    /// template that never reads it is refused, so `--thinking` never silently does nothing.
    pub fn set_thinking(&mut self, on: Option<bool>) -> Result<()> {
        match self {
            Self::Jinja {
                reads_thinking: true,
                thinking,
                ..
            } => {
                *thinking = on;
                Ok(())
            }
            _ if on.is_none() => Ok(()),
            _ => Err(TokenizerError::Template(
                "this model's chat template has no thinking switch (it never reads \
                 `enable_thinking`); leave thinking unset for it"
                    .into(),
            )),
        }
    }

    pub fn is_plain(&self) -> bool {
        matches!(self, Self::Plain)
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        match self {
            Self::Plain => Ok(messages
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n\n")),
            Self::Jinja {
                env,
                bos,
                eos,
                thinking,
                ..
            } => {
                let template = env
                    .get_template(TEMPLATE_NAME)
                    .expect("added at construction");
                let base = minijinja::context! {
                    messages => minijinja::value::Value::from(minijinja::value::Serde(messages)),
                    add_generation_prompt => add_generation_prompt,
                    bos_token => bos,
                    eos_token => eos,
                };
                let context = match thinking {
                    Some(on) => minijinja::context! { enable_thinking => on, ..base },
                    None => base,
                };
                template
                    .render(context)
                    .map_err(|e| TokenizerError::Template(format!("rendering failed: {e}")))
            }
        }
    }

    /// A single-turn prompt, ready for generation: optional system message, then the user's.
    pub fn prompt(&self, system: Option<&str>, user: &str) -> Result<String> {
        let mut messages = Vec::with_capacity(2);
        if let Some(system) = system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", user));
        self.render(&messages, true)
    }
}

/// Templates use this for a "today is" line: today's UTC date, with the common date fields.
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let (y, m, d) = civil_from_days(days);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    fmt.replace("%Y", &y.to_string())
        .replace("%m", &format!("{m:02}"))
        .replace("%d", &format!("{d:02}"))
        .replace("%B", MONTHS[(m - 1) as usize])
        .replace("%b", &MONTHS[(m - 1) as usize][..3])
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn thinking_reaches_a_template_that_reads_it_and_is_refused_by_one_that_does_not() {
        // The switch as Qwen3's template has it: off renders an empty reasoning block.
        let source = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}";
        let mut t = ChatTemplate::jinja(source, "", "").unwrap();
        let header = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n";
        assert_eq!(t.prompt(None, "hi").unwrap(), header);
        t.set_thinking(Some(false)).unwrap();
        assert_eq!(
            t.prompt(None, "hi").unwrap(),
            format!("{header}<think>\n\n</think>\n\n")
        );
        t.set_thinking(Some(true)).unwrap();
        assert_eq!(t.prompt(None, "hi").unwrap(), header);

        let mut chatml = ChatTemplate::jinja(CHATML, "", "").unwrap();
        let err = chatml.set_thinking(Some(false)).unwrap_err().to_string();
        assert!(err.contains("enable_thinking"), "{err}");
        chatml.set_thinking(None).unwrap();
        assert!(ChatTemplate::Plain.set_thinking(Some(true)).is_err());
    }

    #[test]
    fn renders_chatml_with_system_and_generation_prompt() {
        let t = ChatTemplate::jinja(CHATML, "", "").unwrap();
        assert_eq!(
            t.prompt(Some("Be brief."), "Hi").unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let t =
            ChatTemplate::jinja("{{ messages[0]['content'].strip().upper() }}", "", "").unwrap();
        assert_eq!(t.prompt(None, "  hi ").unwrap(), "HI");
        let t =
            ChatTemplate::jinja("{{ raise_exception('roles must alternate') }}", "", "").unwrap();
        assert!(t
            .prompt(None, "x")
            .unwrap_err()
            .to_string()
            .contains("roles must alternate"));
    }

    #[test]
    fn broken_template_is_a_clear_error() {
        let err = ChatTemplate::jinja("{% for %}", "", "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not parse"), "{err}");
    }

    #[test]
    fn plain_fallback_joins_messages() {
        assert_eq!(
            ChatTemplate::Plain.prompt(Some("S"), "U").unwrap(),
            "S\n\nU"
        );
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_785), (2026, 11, 28));
    }
}
