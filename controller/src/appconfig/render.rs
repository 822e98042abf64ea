//! Rendering a release's templates with an environment's values
//! (minijinja, strict: a key the template names and nobody set is an error
//! naming the template and its line).

use std::collections::BTreeMap;

use convoy_common::ops::ConfigFile;
use minijinja::{Environment, UndefinedBehavior};

use super::schema::{ConfigValue, KeyType, Schema, TEMPLATE_DIR};

fn env(schema: &Schema) -> Result<Environment<'static>, String> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    // Configuration files are not HTML.
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.set_keep_trailing_newline(true);
    for t in &schema.templates {
        env.add_template_owned(t.source.clone(), t.text.clone())
            .map_err(|e| explain(&t.source, &e))?;
    }
    Ok(env)
}

/// `convoy/templates/NAME:LINE: what`.
fn explain(source: &str, e: &minijinja::Error) -> String {
    let line = e.line().map(|l| format!(":{l}")).unwrap_or_default();
    let what = match e.kind() {
        minijinja::ErrorKind::UndefinedError => {
            "names a key the release's convoy/config.toml does not declare".to_owned()
        }
        _ => e.detail().map(str::to_owned).unwrap_or_else(|| e.kind().to_string()),
    };
    format!("{TEMPLATE_DIR}/{source}{line}: {what}")
}

/// At push: every template parses and names only declared keys.
pub fn check(schema: &Schema) -> Result<(), String> {
    let env = env(schema)?;
    let sample: BTreeMap<&str, String> = schema
        .keys
        .iter()
        .map(|(k, s)| {
            let v = match s.kind {
                KeyType::Int => "0".to_owned(),
                KeyType::Bool => "false".to_owned(),
                KeyType::String => String::new(),
            };
            (k.as_str(), v)
        })
        .collect();
    for t in &schema.templates {
        let tmpl = env.get_template(&t.source).map_err(|e| explain(&t.source, &e))?;
        tmpl.render(&sample).map_err(|e| explain(&t.source, &e))?;
        // A file that holds a secret is the app user's alone.
        let mut secrets: Vec<String> = tmpl
            .undeclared_variables(false)
            .into_iter()
            .filter(|k| schema.keys.get(k).is_some_and(|s| s.secret))
            .collect();
        secrets.sort();
        if !secrets.is_empty() && t.mode & 0o077 != 0 {
            return Err(format!(
                "{TEMPLATE_DIR}/{} renders the secret {} into a file of mode {:04o}, which others may read; give it mode \"0600\" or \"0400\"",
                t.source,
                secrets.join(", "),
                t.mode
            ));
        }
    }
    Ok(())
}

/// The files a host writes into the release tree: each template rendered
/// with the values, defaults filling what is not set.
pub fn render(schema: &Schema, values: &BTreeMap<String, ConfigValue>) -> Result<Vec<ConfigFile>, String> {
    let env = env(schema)?;
    let mut ctx: BTreeMap<&str, &str> = BTreeMap::new();
    for (k, s) in &schema.keys {
        if let Some(d) = &s.default {
            ctx.insert(k, d);
        }
    }
    for (k, v) in values {
        ctx.insert(k, &v.value);
    }
    schema
        .templates
        .iter()
        .map(|t| {
            let tmpl = env.get_template(&t.source).map_err(|e| explain(&t.source, &e))?;
            let content = tmpl.render(&ctx).map_err(|e| explain(&t.source, &e))?;
            Ok(ConfigFile {
                path: t.destination.clone(),
                mode: t.mode,
                content: content.into_bytes(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(template: &str) -> Schema {
        let t = template.to_owned();
        Schema::parse(
            "[keys.URL]\nrequired = true\n[keys.TOKEN]\nsecret = true\n[keys.PORT]\ntype = \"int\"\ndefault = 80\n\
             [[templates]]\nsource = \"app.env\"\ndestination = \"config/app.env\"\nmode = \"0600\"\n",
            move |_| Some(t.clone()),
        )
        .unwrap()
    }

    #[test]
    fn templates_render_with_values_and_defaults() {
        let s = schema("URL={{ URL }}\nTOKEN={{ TOKEN }}\nPORT={{ PORT }}\n");
        check(&s).unwrap();
        let values = [
            (
                "URL".to_owned(),
                ConfigValue {
                    value: "postgres://db/x?a=<b>".into(),
                    secret: false,
                },
            ),
            (
                "TOKEN".to_owned(),
                ConfigValue {
                    value: "t0k".into(),
                    secret: true,
                },
            ),
        ]
        .into();
        let files = render(&s, &values).unwrap();
        assert_eq!(files[0].path, "config/app.env");
        assert_eq!(files[0].mode, 0o600);
        assert_eq!(
            String::from_utf8(files[0].content.clone()).unwrap(),
            "URL=postgres://db/x?a=<b>\nTOKEN=t0k\nPORT=80\n"
        );
    }

    #[test]
    fn a_secret_goes_only_into_a_file_of_its_user() {
        let mut s = schema("TOKEN={{ TOKEN }}\n");
        s.templates[0].mode = 0o640;
        assert_eq!(
            check(&s).unwrap_err(),
            "convoy/templates/app.env renders the secret TOKEN into a file of mode 0640, which others may read; give it mode \"0600\" or \"0400\""
        );
        s.templates[0].mode = 0o400;
        check(&s).unwrap();
    }

    #[test]
    fn an_undeclared_key_is_refused_with_the_template_and_line() {
        let s = schema("URL={{ URL }}\n\nHOST={{ HOSTNAME }}\n");
        let e = check(&s).unwrap_err();
        assert_eq!(
            e,
            "convoy/templates/app.env:3: names a key the release's convoy/config.toml does not declare"
        );
        let e = check(&schema("{% if %}")).unwrap_err();
        assert!(e.starts_with("convoy/templates/app.env:1: "), "{e}");
    }
}
