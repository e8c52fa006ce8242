//! The Boutiques descriptor (descriptors/chimap.boutiques.json) against the clap definition of
//! the command line, so that neither can change without the other.

use std::collections::BTreeSet;

use chimap::cli::args::Cli;
use clap::{ArgAction, CommandFactory, Parser};
use serde_json::Value;

fn descriptor() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/descriptors/chimap.boutiques.json"
    );
    let text = std::fs::read_to_string(path).expect("descriptor is readable");
    serde_json::from_str(&text).expect("descriptor is JSON")
}

fn inputs(d: &Value) -> &Vec<Value> {
    d["inputs"].as_array().expect("inputs is an array")
}

/// The participant-level command with its derived settings (num_args, defaults) filled in.
fn command() -> clap::Command {
    let mut cmd = Cli::command();
    cmd.build();
    cmd
}

/// Long options that `chimap --help` shows, less --help and --version.
fn visible_long_options(cmd: &clap::Command) -> BTreeSet<String> {
    cmd.get_arguments()
        .filter(|a| !a.is_hide_set())
        .filter(|a| !matches!(a.get_action(), ArgAction::Help | ArgAction::Version))
        .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
        .collect()
}

fn descriptor_flags(d: &Value) -> BTreeSet<String> {
    inputs(d)
        .iter()
        .filter_map(|i| i["command-line-flag"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn every_long_option_is_in_the_descriptor_and_nothing_else() {
    let d = descriptor();
    let cli = visible_long_options(&command());
    let desc = descriptor_flags(&d);
    assert!(cli.contains("--participant-label"), "sanity: {cli:?}");
    let missing: Vec<_> = cli.difference(&desc).collect();
    let unknown: Vec<_> = desc.difference(&cli).collect();
    assert!(
        missing.is_empty(),
        "options of `chimap --help` missing from the descriptor: {missing:?}"
    );
    assert!(
        unknown.is_empty(),
        "descriptor flags that chimap does not have: {unknown:?}"
    );
}

#[test]
fn types_choices_lists_and_defaults_match_the_cli() {
    let d = descriptor();
    let cmd = command();
    for input in inputs(&d) {
        let Some(flag) = input["command-line-flag"].as_str() else {
            continue;
        };
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long().map(|l| format!("--{l}")).as_deref() == Some(flag))
            .unwrap_or_else(|| panic!("{flag} is not an option"));
        let id = input["id"].as_str().unwrap();
        let takes_value = arg.get_action().takes_values();
        assert_eq!(
            input["type"] == "Flag",
            !takes_value,
            "{id}: Flag in the descriptor exactly when the option takes no value"
        );
        let many = arg.get_num_args().is_some_and(|n| n.max_values() > 1);
        assert_eq!(
            input["list"] == true,
            many,
            "{id}: list in the descriptor exactly when the option takes several values"
        );
        let choices: Vec<String> = arg
            .get_possible_values()
            .iter()
            .map(|p| p.get_name().to_string())
            .collect();
        if takes_value && !choices.is_empty() {
            let desc: Vec<String> = input["value-choices"]
                .as_array()
                .unwrap_or_else(|| panic!("{id}: value-choices missing, the CLI has {choices:?}"))
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect();
            assert_eq!(desc, choices, "{id}: value-choices");
        } else {
            assert!(
                input.get("value-choices").is_none(),
                "{id}: no choices in the CLI"
            );
        }
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        match input.get("default-value") {
            Some(v) => assert_eq!(
                vec![v.as_str().map(str::to_string).unwrap_or(v.to_string())],
                defaults,
                "{id}: default-value"
            ),
            None => assert!(
                defaults.is_empty() || !takes_value,
                "{id}: the CLI default {defaults:?} is missing from the descriptor"
            ),
        }
        assert_eq!(input["optional"], true, "{id}: options are optional");
    }
}

#[test]
fn positionals_come_first_in_the_command_line_with_their_choices() {
    let d = descriptor();
    let cmd = command();
    let positionals: Vec<_> = cmd.get_positionals().collect();
    let keys: Vec<String> = positionals
        .iter()
        .map(|a| format!("[{}]", a.get_value_names().unwrap()[0]))
        .collect();
    let template = d["command-line"].as_str().unwrap();
    assert!(
        template.starts_with(&format!("chimap {}", keys.join(" "))),
        "command-line must start with the positionals {keys:?}: {template}"
    );
    for (arg, key) in positionals.iter().zip(&keys) {
        let input = inputs(&d)
            .iter()
            .find(|i| i["value-key"] == key.as_str())
            .unwrap_or_else(|| panic!("no input with value-key {key}"));
        assert_eq!(input["optional"], false, "{key} is required");
        assert!(
            input.get("command-line-flag").is_none(),
            "{key} is positional"
        );
        let choices: Vec<_> = arg.get_possible_values();
        if !choices.is_empty() {
            let names: Vec<_> = choices.iter().map(|p| p.get_name()).collect();
            let desc: Vec<_> = input["value-choices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert_eq!(desc, names, "{key}: value-choices");
        }
    }
    for input in inputs(&d) {
        let key = input["value-key"].as_str().unwrap();
        assert_eq!(
            template.matches(key).count(),
            1,
            "{key} appears once in the command-line"
        );
    }
}

/// A sample value for an input, as bosh would put it on the command line.
fn sample(input: &Value) -> Vec<String> {
    let one = match input["type"].as_str().unwrap() {
        "Flag" => return vec![],
        "Number" if input["integer"] == true => "2".to_string(),
        "Number" => "3.0".to_string(),
        "File" => "file.yaml".to_string(),
        _ => match input["value-choices"].as_array() {
            Some(c) => c[0].as_str().unwrap().to_string(),
            None => "01".to_string(),
        },
    };
    if input["list"] == true {
        vec![one.clone(), format!("{one}b")]
    } else {
        vec![one]
    }
}

#[test]
fn a_command_line_built_from_every_input_parses() {
    let d = descriptor();
    // Of a mutually exclusive group, only the first member is set.
    let excluded: BTreeSet<&str> = d["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|g| g["mutually-exclusive"] == true)
        .flat_map(|g| g["members"].as_array().unwrap()[1..].iter())
        .map(|m| m.as_str().unwrap())
        .collect();
    let mut argv = vec!["chimap".to_string()];
    for input in inputs(&d) {
        if excluded.contains(input["id"].as_str().unwrap()) {
            continue;
        }
        if let Some(flag) = input["command-line-flag"].as_str() {
            argv.push(flag.to_string());
        }
        argv.extend(sample(input));
    }
    let cli = Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("{} does not parse: {e}", argv.join(" ")));
    let run = cli.run;
    assert_eq!(run.participant_label, vec!["01", "01b"]);
    assert!(run.dry_run && run.processing.overwrite);
    assert!(run.logging.verbose == 1 && !run.logging.quiet);
    assert_eq!(run.processing.nthreads, Some(2));

    // The excluded members really do conflict with the first.
    let mut both = argv.clone();
    for id in &excluded {
        let input = inputs(&d).iter().find(|i| i["id"] == *id).unwrap();
        both.push(input["command-line-flag"].as_str().unwrap().to_string());
    }
    assert!(
        excluded.is_empty() || Cli::try_parse_from(&both).is_err(),
        "the descriptor's mutually exclusive group is accepted together by the CLI"
    );
}

#[test]
fn versions_match_the_crate() {
    let d = descriptor();
    assert_eq!(d["tool-version"], chimap::VERSION);
    let image = d["container-image"]["image"].as_str().unwrap();
    assert!(
        image.ends_with(&format!(":{}", chimap::VERSION)),
        "container image {image} is tagged with the crate version"
    );
}
