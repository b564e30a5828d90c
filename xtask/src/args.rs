//! Command-line parsing for every command, on `lexopt`: an option's value may follow
//! it (`--seconds 10`), be joined to it (`--seconds=10`, `-p8080:80`, `-p=8080:80`),
//! and may itself start with `-`. Each command matches the arguments itself and words
//! its own errors, one line naming the argument.

use std::ffi::OsString;
use std::str::FromStr;

pub use lexopt::Arg::{self, Long, Short, Value};
pub use lexopt::Parser;

/// A parser over a command's arguments (the ones after its name).
pub fn parser(args: &[String]) -> Parser {
    Parser::from_args(args)
}

/// The next argument. The only error is a value joined to a flag that takes none
/// (`--quick=yes`), reported as `CMD: unexpected argument for option '--quick': "yes"`.
pub fn next<'a>(p: &'a mut Parser, cmd: &str) -> Result<Option<Arg<'a>>, String> {
    p.next().map_err(|e| format!("{cmd}: {e}"))
}

/// An argument as it was typed, for messages: `--name`, `-n` or the value itself.
pub fn shown(arg: &Arg) -> String {
    match arg {
        Long(name) => format!("--{name}"),
        Short(c) => format!("-{c}"),
        Value(v) => v.to_string_lossy().into_owned(),
    }
}

/// The value of the option just read: `None` when there is none or it is not UTF-8.
pub fn string(p: &mut Parser) -> Option<String> {
    p.value().ok()?.into_string().ok()
}

/// The value of the option just read, parsed: `None` when missing or not a `T`.
pub fn number<T: FromStr>(p: &mut Parser) -> Option<T> {
    string(p)?.parse().ok()
}

/// A positional argument as UTF-8 (the commands' arguments are all text).
pub fn utf8(v: OsString) -> Result<String, String> {
    v.into_string()
        .map_err(|v| format!("argument {v:?} is not UTF-8"))
}

/// Everything after the arguments read so far, untouched (a `--` included).
pub fn rest(p: &mut Parser) -> Result<Vec<String>, String> {
    p.raw_args().map_err(|e| e.to_string())?.map(utf8).collect()
}

/// Whether the next argument is `--`; if so it is taken, and what follows it is the
/// caller's to read with [`rest`].
pub fn at_double_dash(p: &mut Parser) -> bool {
    p.try_raw_args()
        .and_then(|mut raw| raw.next_if(|a| a == "--"))
        .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn values_joined_or_apart() {
        for line in [
            &["--seconds", "7"][..],
            &["--seconds=7"],
            &["-s7"],
            &["-s=7"],
            &["-s", "7"],
        ] {
            let a = args(line);
            let mut p = parser(&a);
            let arg = next(&mut p, "t").unwrap().unwrap();
            assert!(matches!(arg, Long("seconds") | Short('s')), "{line:?}");
            assert_eq!(number::<u64>(&mut p), Some(7), "{line:?}");
            assert!(next(&mut p, "t").unwrap().is_none());
        }
    }

    #[test]
    fn missing_and_bad_values() {
        let a = args(&["--seconds"]);
        let mut p = parser(&a);
        next(&mut p, "t").unwrap();
        assert_eq!(number::<u64>(&mut p), None);
        let a = args(&["--seconds", "x"]);
        let mut p = parser(&a);
        next(&mut p, "t").unwrap();
        assert_eq!(number::<u64>(&mut p), None);
        // A value may start with a dash.
        let a = args(&["-p", "-1"]);
        let mut p = parser(&a);
        next(&mut p, "t").unwrap();
        assert_eq!(string(&mut p).as_deref(), Some("-1"));
    }

    #[test]
    fn a_value_given_to_a_flag_names_the_flag() {
        let a = args(&["--quick=yes"]);
        let mut p = parser(&a);
        assert!(matches!(next(&mut p, "bench"), Ok(Some(Long("quick")))));
        assert_eq!(
            next(&mut p, "bench").err().as_deref(),
            Some(r#"bench: unexpected argument for option '--quick': "yes""#)
        );
    }

    #[test]
    fn shown_as_typed() {
        let a = args(&["--frob=1", "-x", "word"]);
        let mut p = parser(&a);
        assert_eq!(shown(&p.next().unwrap().unwrap()), "--frob");
        p.value().unwrap();
        assert_eq!(shown(&p.next().unwrap().unwrap()), "-x");
        assert_eq!(shown(&p.next().unwrap().unwrap()), "word");
    }

    #[test]
    fn double_dash_then_the_rest_untouched() {
        let a = args(&["-p", "80:80", "--", "sh", "-c", "--", "x"]);
        let mut p = parser(&a);
        assert!(!at_double_dash(&mut p));
        assert!(matches!(p.next(), Ok(Some(Short('p')))));
        assert_eq!(string(&mut p).as_deref(), Some("80:80"));
        assert!(at_double_dash(&mut p));
        assert_eq!(rest(&mut p).unwrap(), args(&["sh", "-c", "--", "x"]));
    }
}
