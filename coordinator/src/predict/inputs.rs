use crate::Error;
use std::{fs, path::PathBuf};

/// File extensions (any case) taken from a directory.
const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// The image files that `paths` name, in order: a file as given (its contents decide its
/// format), a directory as its `*.png`, `*.jpg` and `*.jpeg` files sorted by name. A path that
/// cannot be read, or a directory without images, is an error in its place, with the path,
/// so that the other paths are still used.
pub fn image_files(paths: &[PathBuf]) -> Vec<Result<PathBuf, (PathBuf, Error)>> {
    let mut files = Vec::new();
    for path in paths {
        if !path.is_dir() {
            if path.exists() {
                files.push(Ok(path.clone()));
            } else {
                let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
                files.push(Err((path.clone(), Error::io(path, missing))));
            }
            continue;
        }
        let entries = match fs::read_dir(path) {
            Ok(entries) => entries,
            Err(e) => {
                files.push(Err((path.clone(), Error::io(path, e))));
                continue;
            }
        };
        let mut images: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|file| file.is_file() && has_image_extension(file))
            .collect();
        images.sort();
        if images.is_empty() {
            let problem = format!("a directory without {} files", EXTENSIONS.join("/"));
            let e = Error::Image {
                path: path.clone(),
                problem,
            };
            files.push(Err((path.clone(), e)));
        }
        files.extend(images.into_iter().map(Ok));
    }
    files
}

fn has_image_extension(path: &std::path::Path) -> bool {
    path.extension()
        .and_then(|extension| extension.to_str())
        .is_some_and(|extension| {
            EXTENSIONS
                .iter()
                .any(|known| extension.eq_ignore_ascii_case(known))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_give_their_images_sorted_and_files_stay_in_order() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.PNG", "a.jpg", "c.jpeg", "notes.txt", "d.gif"] {
            fs::write(dir.path().join(name), b"").unwrap();
        }
        fs::create_dir(dir.path().join("nested.png")).unwrap();
        let empty = tempfile::tempdir().unwrap();
        let single = dir.path().join("notes.txt");
        let missing = dir.path().join("missing.png");
        let found = image_files(&[
            single.clone(),
            dir.path().to_path_buf(),
            missing,
            empty.path().to_path_buf(),
        ]);
        let names: Vec<String> = found
            .iter()
            .map(|file| match file {
                Ok(path) => path.file_name().unwrap().to_string_lossy().into_owned(),
                Err((_, e)) => format!("error: {e}"),
            })
            .collect();
        assert_eq!(names[..4], ["notes.txt", "a.jpg", "b.PNG", "c.jpeg"]);
        assert!(names[4].starts_with("error:") && names[4].contains("missing.png"));
        assert!(names[5].contains("a directory without"), "{}", names[5]);
        assert_eq!(names.len(), 6);
    }
}
