//! `refusal-steer chat`: an interactive conversation, streamed token by token.

use crate::generate::DecodingArgs;
use crate::steering::SteerArgs;
use crate::ModelArg;
use anyhow::Result;
use clap::Args;
use refusal_steer_engine::{generate, Flow, Request};
use refusal_steer_pipeline::answers::encode_with_bos;
use refusal_steer_tokenizer::{Message, StreamDecoder};
use std::io::{BufRead, Write};

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    decoding: DecodingArgs,
    #[command(flatten)]
    steering: SteerArgs,
}

pub fn run(args: ChatArgs) -> Result<()> {
    let model = args.model.load()?;
    let options = args.decoding.options(&model)?;
    let recipe = args.steering.recipe(&model)?.map(|(recipe, _)| recipe);
    let interventions = recipe
        .as_ref()
        .map(|r| r.interventions(&model))
        .transpose()?;
    let format = args.decoding.format.format();
    let opening = format.shared_prefix(&model)?;
    let mut history: Vec<Message> = args
        .decoding
        .format
        .system
        .iter()
        .map(|s| Message::new("system", s))
        .collect();
    eprintln!(
        "chatting with {} (/reset clears the conversation, /exit or Ctrl-D quits)",
        model.path.display()
    );
    let stdin = std::io::stdin();
    let mut turn = 0u64;
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.truncate(usize::from(args.decoding.format.system.is_some()));
                continue;
            }
            _ => {}
        }
        history.push(Message::new("user", line));
        let text = model.template.render(&history, true)?;
        let request = Request {
            prompt: encode_with_bos(&model, &text),
            seed: args.decoding.seed.wrapping_add(turn),
        };
        turn += 1;
        // With a gated recipe, each user message decides whether its answer is steered.
        let steering = match &recipe {
            Some(r)
                if !r.steered(&model, &format, opening.as_ref(), &[line.to_string()], 1)?[0] =>
            {
                eprintln!("(the gate leaves this message unsteered)");
                None
            }
            _ => interventions.as_ref(),
        };
        let mut decoder = StreamDecoder::default();
        let mut stdout = std::io::stdout();
        let out = generate(&model, &[request], &options, steering, &mut |seen| {
            if let Ok(bytes) = model.tokenizer.token_bytes(seen.token, false) {
                let _ = write!(stdout, "{}", decoder.push(&bytes));
                let _ = stdout.flush();
            }
            Flow::Continue
        })?;
        println!("{}", decoder.finish());
        let answer = model.tokenizer.decode(&out[0].tokens, false)?;
        history.push(Message::new("assistant", &answer));
    }
    Ok(())
}
